"""`/api/v1/devices`: HTTP only; the logic is in `service.py`."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from litestar import Controller, Response, delete, get, patch, post
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, JSONBody, QueryParameter
from litestar.status_codes import HTTP_202_ACCEPTED, HTTP_204_NO_CONTENT

from libs.messages import Connection, DeviceStateName
from libs.principals import Permission, Principal
from services.gateway.auth.context import Context, provide_context
from services.gateway.auth.guards import requires
from services.gateway.body import StrictBody
from services.gateway.devices.schemas import (
    CommandCreate,
    CommandView,
    Device,
    DeviceCreate,
    DevicePage,
    DeviceUpdate,
    HistoryPage,
    Lifecycle,
    StatisticsPage,
)
from services.gateway.devices.service import (
    DeviceFilters,
    DeviceService,
    HistoryQuery,
    StatisticsQuery,
)
from services.gateway.pagination import CursorParam, SinceParam, limit_param, utc
from services.gateway.resources import Resources

READ = [requires(Permission.READ)]
MANAGE = [requires(Permission.MANAGE_DEVICES)]


def provide_device_service(resources: NamedDependency[Resources]) -> DeviceService:
    return DeviceService(resources.sessions, resources.nc, resources.js, resources.cache)


class DeviceController(Controller):
    path = "/devices"
    tags = ["devices"]
    dependencies = {
        "devices": Provide(provide_device_service, sync_to_thread=False),
        "ctx": Provide(provide_context, sync_to_thread=False),
    }

    @post(
        "/",
        dto=StrictBody[DeviceCreate],
        guards=MANAGE,
        operation_id="createDevice",
        summary="Register a device",
        description="Without `id` one is generated. An id that exists answers 409. "
        "An installer's device needs a `location` in one of its homes.",
    )
    async def create(
        self,
        devices: NamedDependency[DeviceService],
        data: JSONBody[DeviceCreate],
        ctx: NamedDependency[Context],
    ) -> Device:
        return await devices.create(data, ctx)

    @get(
        "/",
        guards=READ,
        operation_id="listDevices",
        summary="List devices",
        description="The devices of the caller's homes. Filters combine; `location` matches "
        "a path prefix (`home/ground`).",
    )
    async def list_devices(
        self,
        devices: NamedDependency[DeviceService],
        principal: NamedDependency[Principal],
        cursor: CursorParam = None,
        kind: Annotated[str | None, QueryParameter(max_length=64)] = None,
        location: Annotated[str | None, QueryParameter(max_length=512)] = None,
        device_state: Annotated[DeviceStateName | None, QueryParameter(name="state")] = None,
        connection: Annotated[
            Connection | None, QueryParameter(description="online or offline")
        ] = None,
        lifecycle: Annotated[
            Lifecycle | None, QueryParameter(description="`pending`: waiting for approval")
        ] = None,
        limit: Annotated[int, limit_param(50, 500)] = 50,
    ) -> DevicePage:
        filters = DeviceFilters(
            kind=kind,
            location=location,
            state=device_state,
            connection=connection,
            lifecycle=lifecycle,
        )
        return await devices.list(filters, limit, cursor, principal)

    @get(
        "/{device_id:str}",
        guards=READ,
        operation_id="getDevice",
        summary="Get a device and its state",
        description="`reports` says per attribute when it was last reported and whether it is "
        "`stale`: not reported for longer than its expected interval (the kind's default, or "
        "the entry's `report_intervals`) while the device is online; `presence` is `stale` "
        "then.",
    )
    async def get_device(
        self,
        devices: NamedDependency[DeviceService],
        principal: NamedDependency[Principal],
        device_id: FromPath[str],
    ) -> Device:
        return await devices.get(device_id, principal)

    @patch(
        "/{device_id:str}",
        dto=StrictBody[DeviceUpdate],
        guards=MANAGE,
        operation_id="updateDevice",
        summary="Change a device's registry fields",
        description="Approve (`lifecycle: active`), reject, decommission, rename, move. An "
        "installer's device stays in one of its homes.",
    )
    async def update(
        self,
        devices: NamedDependency[DeviceService],
        device_id: FromPath[str],
        data: JSONBody[DeviceUpdate],
        ctx: NamedDependency[Context],
    ) -> Device:
        return await devices.update(device_id, data, ctx)

    @delete(
        "/{device_id:str}",
        guards=MANAGE,
        operation_id="deleteDevice",
        summary="Remove a device from the registry",
        status_code=HTTP_204_NO_CONTENT,
    )
    async def delete_device(
        self,
        devices: NamedDependency[DeviceService],
        device_id: FromPath[str],
        ctx: NamedDependency[Context],
    ) -> None:
        await devices.delete(device_id, ctx)

    @post(
        "/{device_id:str}/connect",
        guards=MANAGE,
        operation_id="connectDevice",
        summary="Attach a device to the system again",
        status_code=200,
    )
    async def connect(
        self,
        devices: NamedDependency[DeviceService],
        device_id: FromPath[str],
        ctx: NamedDependency[Context],
    ) -> Device:
        return await devices.set_enabled(device_id, True, ctx)

    @post(
        "/{device_id:str}/disconnect",
        guards=MANAGE,
        operation_id="disconnectDevice",
        summary="Detach a device: its events are refused and it takes no commands",
        status_code=200,
    )
    async def disconnect(
        self,
        devices: NamedDependency[DeviceService],
        device_id: FromPath[str],
        ctx: NamedDependency[Context],
    ) -> Device:
        return await devices.set_enabled(device_id, False, ctx)

    @post(
        "/{device_id:str}/commands",
        dto=StrictBody[CommandCreate],
        guards=[requires(Permission.COMMAND)],
        operation_id="sendCommand",
        summary="Send a command to a device",
        description="Answers 202 with the command, `pending` until the device answers.",
        status_code=HTTP_202_ACCEPTED,
    )
    async def send_command(
        self,
        devices: NamedDependency[DeviceService],
        device_id: FromPath[str],
        data: JSONBody[CommandCreate],
        ctx: NamedDependency[Context],
    ) -> Response[CommandView]:
        command = await devices.send_command(device_id, data, ctx)
        location = f"/api/v1/devices/{device_id}/commands/{command.id}"
        return Response(command, status_code=HTTP_202_ACCEPTED, headers={"Location": location})

    @get(
        "/{device_id:str}/commands/{command_id:str}",
        guards=READ,
        operation_id="getCommand",
        summary="Follow a command's status",
    )
    async def get_command(
        self,
        devices: NamedDependency[DeviceService],
        principal: NamedDependency[Principal],
        device_id: FromPath[str],
        command_id: FromPath[str],
    ) -> CommandView:
        return await devices.get_command(device_id, command_id, principal)

    @get(
        "/{device_id:str}/history",
        guards=READ,
        operation_id="getDeviceHistory",
        summary="Telemetry and state history, newest last",
        description="`since` is inclusive, `until` exclusive.",
    )
    async def history(
        self,
        devices: NamedDependency[DeviceService],
        principal: NamedDependency[Principal],
        device_id: FromPath[str],
        cursor: CursorParam = None,
        since: SinceParam = None,
        until: Annotated[datetime | None, QueryParameter(description="ISO 8601 time")] = None,
        event_type: Annotated[str | None, QueryParameter(name="type", max_length=128)] = None,
        limit: Annotated[int, limit_param(100, 1000)] = 100,
    ) -> HistoryPage:
        query = HistoryQuery(since=utc(since), until=utc(until), type=event_type)
        return await devices.history(device_id, query, limit, cursor, principal)

    @get(
        "/{device_id:str}/statistics",
        guards=READ,
        operation_id="getDeviceStatistics",
        summary="Hourly statistics of numeric attributes, oldest first",
        description=(
            "Per UTC hour and attribute: count, mean, min, max and the last value, rolled up "
            "by the recorder once the hour has ended. `since` is inclusive, `until` exclusive, "
            "on the hour's start."
        ),
    )
    async def statistics(
        self,
        devices: NamedDependency[DeviceService],
        principal: NamedDependency[Principal],
        device_id: FromPath[str],
        cursor: CursorParam = None,
        attribute: Annotated[
            str | None, QueryParameter(max_length=128, description="e.g. power_w; all without")
        ] = None,
        since: SinceParam = None,
        until: Annotated[datetime | None, QueryParameter(description="ISO 8601 time")] = None,
        limit: Annotated[int, limit_param(168, 1000)] = 168,
    ) -> StatisticsPage:
        query = StatisticsQuery(attribute=attribute, since=utc(since), until=utc(until))
        return await devices.statistics(device_id, query, limit, cursor, principal)
