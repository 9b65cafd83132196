"""`/api/v1/locations`: HTTP only; the logic is in `service.py`."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, delete, get, patch, post
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, JSONBody, QueryParameter
from litestar.status_codes import HTTP_204_NO_CONTENT

from services.gateway.body import StrictBody
from services.gateway.correlation import provide_correlation_id
from services.gateway.identity import ACTOR
from services.gateway.locations.schemas import (
    Location,
    LocationCreate,
    LocationKind,
    LocationPage,
    LocationUpdate,
)
from services.gateway.locations.service import LocationService
from services.gateway.pagination import CursorParam, limit_param
from services.gateway.resources import Resources


def provide_location_service(resources: NamedDependency[Resources]) -> LocationService:
    return LocationService(resources.sessions, resources.nc, resources.js)


class LocationController(Controller):
    path = "/locations"
    tags = ["locations"]
    dependencies = {
        "locations": Provide(provide_location_service, sync_to_thread=False),
        "correlation_id": Provide(provide_correlation_id, sync_to_thread=False),
    }

    @post(
        "/",
        dto=StrictBody[LocationCreate],
        operation_id="createLocation",
        summary="Define a home, a floor or a room",
        description="A floor goes in a home, a room in a home or on a floor. Once a home is "
        "defined, its devices' `location` must be one of its paths.",
    )
    async def create(
        self,
        locations: NamedDependency[LocationService],
        data: JSONBody[LocationCreate],
        correlation_id: NamedDependency[str],
    ) -> Location:
        return await locations.create(data, actor=ACTOR, correlation_id=correlation_id)

    @get("/", operation_id="listLocations", summary="List locations, in path order")
    async def list_locations(
        self,
        locations: NamedDependency[LocationService],
        cursor: CursorParam = None,
        parent_id: Annotated[str | None, QueryParameter(max_length=128)] = None,
        kind: Annotated[
            LocationKind | None, QueryParameter(description="home, floor or room")
        ] = None,
        limit: Annotated[int, limit_param(100, 500)] = 100,
    ) -> LocationPage:
        return await locations.list(parent_id, kind, limit, cursor)

    @get("/{location_id:str}", operation_id="getLocation", summary="Get a location")
    async def get_location(
        self, locations: NamedDependency[LocationService], location_id: FromPath[str]
    ) -> Location:
        return await locations.get(location_id)

    @patch(
        "/{location_id:str}",
        dto=StrictBody[LocationUpdate],
        operation_id="renameLocation",
        summary="Rename a location",
    )
    async def rename(
        self,
        locations: NamedDependency[LocationService],
        location_id: FromPath[str],
        data: JSONBody[LocationUpdate],
        correlation_id: NamedDependency[str],
    ) -> Location:
        return await locations.update(location_id, data, actor=ACTOR, correlation_id=correlation_id)

    @delete(
        "/{location_id:str}",
        operation_id="deleteLocation",
        summary="Delete an empty location (no locations or devices in it)",
        status_code=HTTP_204_NO_CONTENT,
    )
    async def delete_location(
        self,
        locations: NamedDependency[LocationService],
        location_id: FromPath[str],
        correlation_id: NamedDependency[str],
    ) -> None:
        await locations.delete(location_id, actor=ACTOR, correlation_id=correlation_id)
