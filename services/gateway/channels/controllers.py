"""`/api/v1/channels`: HTTP only; the logic is in `service.py`."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, delete, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, JSONBody
from litestar.status_codes import HTTP_202_ACCEPTED, HTTP_204_NO_CONTENT

from libs.principals import Permission, Principal
from libs.webhooks import WebhookSettings
from services.gateway.auth.context import Context, provide_context
from services.gateway.auth.guards import requires
from services.gateway.body import StrictBody
from services.gateway.channels.schemas import (
    Channel,
    ChannelCreate,
    ChannelDelivery,
    ChannelDeliveryPage,
    ChannelPage,
)
from services.gateway.channels.service import ChannelService
from services.gateway.deliveries import StatusParam
from services.gateway.pagination import CursorParam, limit_param
from services.gateway.resources import Resources


def provide_channel_service(resources: NamedDependency[Resources]) -> ChannelService:
    hooks = WebhookSettings.of(resources.settings)
    return ChannelService(resources.sessions, resources.nc, hooks)


class ChannelController(Controller):
    path = "/channels"
    tags = ["channels"]
    # Who manages its homes' webhooks manages their notification channels.
    guards = [requires(Permission.MANAGE_SUBSCRIPTIONS)]
    dependencies = {
        "channels": Provide(provide_channel_service, sync_to_thread=False),
        "ctx": Provide(provide_context, sync_to_thread=False),
    }

    @post(
        "/",
        dto=StrictBody[ChannelCreate],
        operation_id="createChannel",
        summary="Create a notification channel (e-mail, Slack-compatible, ntfy)",
        description="The alerts of rules whose `notify` action names this channel "
        "(`channel: <id>`) go to it as an e-mail, a Slack message or an ntfy notification, "
        "retried with back-off like webhooks. Its secret (SMTP password, webhook URL, ntfy "
        "token) is never shown again: answers say `secret_set`. Destinations follow the "
        "webhooks' rule: private, loopback or link-local addresses only for an "
        "administrator, inside SMARTHOME_WEBHOOK_ALLOW_NETS.",
    )
    async def create(
        self,
        channels: NamedDependency[ChannelService],
        data: JSONBody[ChannelCreate],
        ctx: NamedDependency[Context],
    ) -> Channel:
        return await channels.create(data, ctx, admin=ctx.principal.is_admin)

    @get(
        "/",
        operation_id="listChannels",
        summary="List notification channels",
        description="Those of the caller's homes.",
    )
    async def list_channels(
        self,
        channels: NamedDependency[ChannelService],
        principal: NamedDependency[Principal],
        cursor: CursorParam = None,
        limit: Annotated[int, limit_param(50, 500)] = 50,
    ) -> ChannelPage:
        return await channels.list(limit, cursor, principal)

    @get("/{channel_id:str}", operation_id="getChannel", summary="Get a notification channel")
    async def get_channel(
        self,
        channels: NamedDependency[ChannelService],
        principal: NamedDependency[Principal],
        channel_id: FromPath[str],
    ) -> Channel:
        return await channels.get(channel_id, principal)

    @delete(
        "/{channel_id:str}",
        operation_id="deleteChannel",
        summary="Delete a notification channel and its delivery records",
        status_code=HTTP_204_NO_CONTENT,
    )
    async def delete_channel(
        self,
        channels: NamedDependency[ChannelService],
        channel_id: FromPath[str],
        ctx: NamedDependency[Context],
    ) -> None:
        await channels.delete(channel_id, ctx)

    @get(
        "/{channel_id:str}/deliveries",
        operation_id="listChannelDeliveries",
        summary="A channel's notifications that needed a retry, oldest first",
        description="`pending` while retried, `delivered` once a retry succeeded, `failed` "
        "when the retry window ended (re-drive them one by one). A notification delivered "
        "on its first attempt has no record: the channel's `delivered` counts it.",
    )
    async def deliveries(
        self,
        channels: NamedDependency[ChannelService],
        principal: NamedDependency[Principal],
        channel_id: FromPath[str],
        status: StatusParam = None,
        cursor: CursorParam = None,
        limit: Annotated[int, limit_param(50, 500)] = 50,
    ) -> ChannelDeliveryPage:
        return await channels.deliveries(channel_id, status, limit, cursor, principal)

    @post(
        "/{channel_id:str}/deliveries/{delivery_id:int}/redrive",
        operation_id="redriveChannelDelivery",
        summary="Send a failed notification again",
        description="The delivery becomes `pending` and is sent once more, from the stream; "
        "409 when it has not failed.",
        status_code=HTTP_202_ACCEPTED,
    )
    async def redrive(
        self,
        channels: NamedDependency[ChannelService],
        channel_id: FromPath[str],
        delivery_id: FromPath[int],
        ctx: NamedDependency[Context],
    ) -> ChannelDelivery:
        return await channels.redrive(channel_id, delivery_id, ctx)
