"""`/api/v1/locations`: HTTP only; the logic is in `service.py`."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, delete, get, patch, post
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, JSONBody, QueryParameter
from litestar.status_codes import HTTP_204_NO_CONTENT

from libs.principals import Permission, Principal
from services.gateway.auth.context import Context, provide_context
from services.gateway.auth.guards import requires
from services.gateway.body import StrictBody
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

READ = [requires(Permission.READ)]
MANAGE = [requires(Permission.MANAGE_LOCATIONS)]


def provide_location_service(resources: NamedDependency[Resources]) -> LocationService:
    return LocationService(resources.sessions, resources.nc, resources.js)


class LocationController(Controller):
    path = "/locations"
    tags = ["locations"]
    dependencies = {
        "locations": Provide(provide_location_service, sync_to_thread=False),
        "ctx": Provide(provide_context, sync_to_thread=False),
    }

    @post(
        "/",
        dto=StrictBody[LocationCreate],
        guards=MANAGE,
        operation_id="createLocation",
        summary="Define a home, a floor or a room",
        description="A floor goes in a home, a room in a home or on a floor. Once a home is "
        "defined, its devices' `location` must be one of its paths. An installer defines "
        "the homes it was given (by their ids) and what is in them.",
    )
    async def create(
        self,
        locations: NamedDependency[LocationService],
        data: JSONBody[LocationCreate],
        ctx: NamedDependency[Context],
    ) -> Location:
        return await locations.create(data, ctx)

    @get(
        "/",
        guards=READ,
        operation_id="listLocations",
        summary="List locations, in path order",
        description="The locations of the caller's homes.",
    )
    async def list_locations(
        self,
        locations: NamedDependency[LocationService],
        principal: NamedDependency[Principal],
        cursor: CursorParam = None,
        parent_id: Annotated[str | None, QueryParameter(max_length=128)] = None,
        kind: Annotated[
            LocationKind | None, QueryParameter(description="home, floor or room")
        ] = None,
        limit: Annotated[int, limit_param(100, 500)] = 100,
    ) -> LocationPage:
        return await locations.list(parent_id, kind, limit, cursor, principal)

    @get("/{location_id:str}", guards=READ, operation_id="getLocation", summary="Get a location")
    async def get_location(
        self,
        locations: NamedDependency[LocationService],
        principal: NamedDependency[Principal],
        location_id: FromPath[str],
    ) -> Location:
        return await locations.get(location_id, principal)

    @patch(
        "/{location_id:str}",
        dto=StrictBody[LocationUpdate],
        guards=MANAGE,
        operation_id="renameLocation",
        summary="Rename a location",
    )
    async def rename(
        self,
        locations: NamedDependency[LocationService],
        location_id: FromPath[str],
        data: JSONBody[LocationUpdate],
        ctx: NamedDependency[Context],
    ) -> Location:
        return await locations.update(location_id, data, ctx)

    @delete(
        "/{location_id:str}",
        guards=MANAGE,
        operation_id="deleteLocation",
        summary="Delete an empty location (no locations or devices in it)",
        status_code=HTTP_204_NO_CONTENT,
    )
    async def delete_location(
        self,
        locations: NamedDependency[LocationService],
        location_id: FromPath[str],
        ctx: NamedDependency[Context],
    ) -> None:
        await locations.delete(location_id, ctx)
