"""Notification channels: a row in `channels` and one durable JetStream consumer on the
notifications rules address to it (`webhook-<id>-notify`, `system.notify.<id>`), created and
deleted together. The webhooks service delivers them with the subscriptions' machinery; a
change is announced on `system.subscription.<id>.changed` so that it reloads (channel and
subscription ids share the `system.notify.<id>` space).
"""

from __future__ import annotations

from urllib.parse import urlsplit

import msgspec
from sqlalchemy.ext.asyncio import AsyncSession

from libs import messages as m
from libs import subjects, webhooks
from libs.db.models import Channel as ChannelRow
from libs.db.models import Delivery
from libs.errors import Invalid
from libs.principals import Principal
from services.gateway import deliveries, scope
from services.gateway.auth.context import Context
from services.gateway.changes import Change
from services.gateway.channels.schemas import (
    Channel,
    ChannelCreate,
    ChannelDelivery,
    ChannelDeliveryPage,
    ChannelPage,
    EmailSettings,
    NtfySettings,
    SlackSettings,
)
from services.gateway.deliveries import CHANNELS, AddresseeService, DeliveryStatus
from services.gateway.pagination import page
from services.gateway.resources import require_bus


class ChannelService(AddresseeService):
    async def create(self, data: ChannelCreate, ctx: Context, *, admin: bool) -> Channel:
        """Store the channel and create its consumer. Its destination may be a private,
        loopback or link-local address inside the allow-nets only when `admin`, as a webhook
        subscription's (`libs.webhooks.check_url`)."""
        home = scope.home_for(ctx.principal, data.home, "$.home")
        await self._check(data.config, allow_private_targets=admin)
        require_bus(self._nc)
        row = ChannelRow(
            id=m.new_id(),
            name=data.name,
            kind=data.config.__struct_config__.tag,
            config=msgspec.to_builtins(data.config),
            enabled=True,
            created_by=ctx.principal.actor,
            home=home,
            private_targets=admin,
            created_at=m.now(),
            delivered_count=0,
        )
        config = webhooks.notify_consumer_config(row.id, self._settings.ack_wait_s)
        await deliveries.create(
            self._sessions,
            self._js,
            row,
            [(subjects.SYSTEM_STREAM, config)],
            lambda s: _signal(s, row, "created", ctx),
        )
        return _view(row)

    async def get(self, channel_id: str, principal: Principal) -> Channel:
        async with self._sessions() as session:
            return _view(await CHANNELS.find(session, channel_id, principal))

    async def list(self, limit: int, cursor: str | None, principal: Principal) -> ChannelPage:
        async with self._sessions() as session:
            rows = await CHANNELS.listed(session, principal, limit, cursor)
        return page(rows, limit, key=lambda r: r.id, view=_view, into=ChannelPage)

    async def delete(self, channel_id: str, ctx: Context) -> None:
        """Remove the channel, its consumer and its delivery records."""
        require_bus(self._nc)
        async with self._sessions.begin() as session:
            row = await CHANNELS.find(session, channel_id, ctx.principal)
            consumer = (subjects.SYSTEM_STREAM, subjects.webhook_notify_consumer(row.id))
            await deliveries.remove(session, self._js, row, [consumer])
            _signal(session, row, "deleted", ctx)

    async def deliveries(
        self,
        channel_id: str,
        status: DeliveryStatus | None,
        limit: int,
        cursor: str | None,
        principal: Principal,
    ) -> ChannelDeliveryPage:
        """The channel's notifications that needed more than one attempt, oldest first."""
        async with self._sessions() as session:
            rows = await CHANNELS.deliveries(session, channel_id, principal, status, limit, cursor)
        return page(rows, limit, key=lambda r: r.id, view=_delivery_view, into=ChannelDeliveryPage)

    async def redrive(self, channel_id: str, delivery_id: int, ctx: Context) -> ChannelDelivery:
        """Send a failed delivery once more (from the stream): it is `pending` until then."""
        require_bus(self._nc)
        async with self._sessions.begin() as session:
            row = await CHANNELS.find(session, channel_id, ctx.principal)
            delivery = await CHANNELS.redrive_one(session, channel_id, delivery_id)
            _signal(session, row, "redelivered", ctx, delivery_id)
            return _delivery_view(delivery)

    async def _check(self, config: m.ChannelConfig, *, allow_private_targets: bool) -> None:
        """Refuse a destination a webhook could not reach, and a password sent in clear."""
        match config:
            case m.EmailChannel():
                if config.password is not None and config.username is None:
                    raise Invalid("a password needs a username", field="$.config.username")
                if config.password is not None and config.security == "none":
                    raise Invalid(
                        "a password goes over TLS only (security `starttls` or `tls`)",
                        field="$.config.security",
                    )
                host = f"[{config.host}]" if ":" in config.host else config.host
                url, field = f"https://{host}:{config.port}", "$.config.host"
            case m.SlackChannel():
                url, field = config.url, "$.config.url"
            case m.NtfyChannel():
                url, field = config.server, "$.config.server"
        await deliveries.check_url(
            url,
            self._settings,
            allow_private_targets=allow_private_targets,
            field=field,
            # A Slack-compatible webhook's path is its token.
            show_path=not isinstance(config, m.SlackChannel),
        )


def _settings(config: m.ChannelConfig) -> EmailSettings | SlackSettings | NtfySettings:
    match config:
        case m.EmailChannel():
            return EmailSettings(
                host=config.host,
                port=config.port,
                security=config.security,
                username=config.username,
                from_=config.from_,
                to=list(config.to),
            )
        case m.SlackChannel():
            return SlackSettings(host=urlsplit(config.url).hostname or "")
        case m.NtfyChannel():
            return NtfySettings(server=webhooks.shown_url(config.server), topic=config.topic)


def _secret_set(config: m.ChannelConfig) -> bool:
    match config:
        case m.EmailChannel():
            return config.password is not None
        case m.SlackChannel():
            return True
        case m.NtfyChannel():
            return config.token is not None


def _config(row: ChannelRow) -> m.ChannelConfig:
    return msgspec.convert(row.config, m.ChannelConfig)


def _view(row: ChannelRow) -> Channel:
    config = _config(row)
    return Channel(
        id=row.id,
        name=row.name,
        kind=row.kind,
        config=_settings(config),
        secret_set=_secret_set(config),
        enabled=row.enabled,
        home=row.home,
        created_by=row.created_by,
        created_at=row.created_at,
        delivered=row.delivered_count or 0,
        last_delivered_at=row.last_delivered_at,
    )


def _signal(
    session: AsyncSession,
    row: ChannelRow,
    change: Change,
    ctx: Context,
    delivery_id: int | None = None,
) -> None:
    """The change as the audit tells it, never with its secret
    (`deliveries.Addressees.announce`)."""
    settings = msgspec.to_builtins(_settings(_config(row)))
    detail = {"name": row.name, "kind": row.kind, "config": settings}
    if delivery_id is not None:
        detail["delivery"] = delivery_id
    CHANNELS.announce(session, row, change, ctx, detail)


def _delivery_view(row: Delivery) -> ChannelDelivery:
    return ChannelDelivery(**deliveries.record_fields(row), channel_id=row.subscription_id)
