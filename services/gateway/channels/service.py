"""Notification channels: a row in `channels` and one durable JetStream consumer on the
notifications rules address to it (`webhook-<id>-notify`, `system.notify.<id>`), created and
deleted together. The webhooks service delivers them with the subscriptions' machinery; a
change is announced on `system.subscription.<id>.changed` so that it reloads (channel and
subscription ids share the `system.notify.<id>` space).
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit

import msgspec
from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import messages as m
from libs import subjects, webhooks
from libs.db.models import Channel as ChannelRow
from libs.db.models import Delivery
from libs.errors import Conflict, Invalid, NotFound
from libs.principals import Principal
from services.gateway import scope
from services.gateway.auth.context import Context
from services.gateway.changes import Change, record_change
from services.gateway.channels.schemas import (
    Channel,
    ChannelCreate,
    ChannelDelivery,
    ChannelDeliveryPage,
    ChannelPage,
    DeliveryStatus,
    EmailSettings,
    NtfySettings,
    SlackSettings,
)
from services.gateway.pagination import decode_cursor, keyset, page
from services.gateway.resources import require_bus


class ChannelService:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        nc: NATS,
        settings: webhooks.WebhookSettings,
    ) -> None:
        self._sessions = sessions
        self._nc = nc
        self._js = nc.jetstream()
        self._settings = settings

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
        try:
            async with self._sessions.begin() as session:
                session.add(row)
                await session.flush()
                await self._js.add_consumer(subjects.SYSTEM_STREAM, config)
                _signal(session, row, "created", ctx)
        except BaseException:
            # The row did not commit: a consumer without one would keep nothing useful.
            with contextlib.suppress(Exception):
                await self._js.delete_consumer(
                    subjects.SYSTEM_STREAM, subjects.webhook_notify_consumer(row.id)
                )
            raise
        return _view(row)

    async def get(self, channel_id: str, principal: Principal) -> Channel:
        async with self._sessions() as session:
            return _view(await self._row(session, channel_id, principal))

    async def list(self, limit: int, cursor: str | None, principal: Principal) -> ChannelPage:
        query = keyset(select(ChannelRow), ChannelRow.id, limit, cursor)
        query = scope.homed(principal, query, ChannelRow.home)
        async with self._sessions() as session:
            rows = list(await session.scalars(query))
        return page(rows, limit, key=lambda r: r.id, view=_view, into=ChannelPage)

    async def delete(self, channel_id: str, ctx: Context) -> None:
        """Remove the channel, its consumer and its delivery records."""
        require_bus(self._nc)
        async with self._sessions.begin() as session:
            row = await self._row(session, channel_id, ctx.principal)
            await session.execute(delete(Delivery).where(Delivery.subscription_id == row.id))
            await session.delete(row)
            await session.flush()
            with contextlib.suppress(NotFoundError):
                await self._js.delete_consumer(
                    subjects.SYSTEM_STREAM, subjects.webhook_notify_consumer(row.id)
                )
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
        query = (
            select(Delivery)
            .where(Delivery.subscription_id == channel_id)
            .order_by(Delivery.id)
            .limit(limit + 1)
        )
        if status:
            query = query.where(Delivery.status == status)
        if cursor:
            query = query.where(Delivery.id > decode_cursor(cursor, int))
        async with self._sessions() as session:
            await self._row(session, channel_id, principal)
            rows = list(await session.scalars(query))
        return page(rows, limit, key=lambda r: r.id, view=_delivery_view, into=ChannelDeliveryPage)

    async def redrive(self, channel_id: str, delivery_id: int, ctx: Context) -> ChannelDelivery:
        """Send a failed delivery once more (from the stream): it is `pending` until then."""
        require_bus(self._nc)
        async with self._sessions.begin() as session:
            row = await self._row(session, channel_id, ctx.principal)
            delivery = await session.get(Delivery, delivery_id)
            if delivery is None or delivery.subscription_id != channel_id:
                raise NotFound(f"channel {channel_id!r} has no delivery {delivery_id}")
            if delivery.status != webhooks.FAILED:
                raise Conflict(
                    f"delivery {delivery_id} is {delivery.status}: only a failed one is re-driven"
                )
            delivery.status = webhooks.PENDING
            delivery.next_attempt_at = None
            await session.flush()
            _signal(session, row, "redelivered", ctx, delivery_id)
            return _delivery_view(delivery)

    async def _row(
        self, session: AsyncSession, channel_id: str, principal: Principal
    ) -> ChannelRow:
        row = await session.get(ChannelRow, channel_id)
        missing = f"channel {channel_id!r} does not exist"
        if row is None:
            raise NotFound(missing)
        scope.visible(principal, row.home, missing)
        return row

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
                url, field = f"https://{host}:{config.port}/", "$.config.host"
            case m.SlackChannel():
                url, field = config.url, "$.config.url"
            case m.NtfyChannel():
                url, field = config.server, "$.config.server"
        try:
            # getaddrinfo blocks: resolve in a thread.
            await asyncio.to_thread(
                webhooks.check_url,
                url,
                self._settings.allow_nets,
                allow_private_targets=allow_private_targets,
            )
        except ValueError as exc:
            raise Invalid(f"{_shown(url)!r}: {exc}", field=field) from None


def _shown(url: str) -> str:
    """What answers and the audit show of a URL: its scheme and host (a webhook URL's path
    and query carry its token)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}"


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
            return NtfySettings(server=config.server, topic=config.topic)


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
    """The webhooks service reloads the channel; the recorder audits the change (never its
    secret). In the change's transaction: published after its commit."""
    settings = msgspec.to_builtins(_settings(_config(row)))
    detail = {"name": row.name, "kind": row.kind, "config": settings}
    if delivery_id is not None:
        detail["delivery"] = delivery_id
    record_change(
        session,
        subjects.subscription_changed(row.id),
        "channel",
        row.id,
        change,
        actor=ctx.principal.actor,
        correlation_id=ctx.correlation_id,
        detail=detail,
        home=row.home,
    )


def _delivery_view(row: Delivery) -> ChannelDelivery:
    return ChannelDelivery(
        id=row.id,
        channel_id=row.subscription_id,
        event_id=row.event_id,
        subject=row.subject,
        status=row.status,  # type: ignore[arg-type]  # a DeliveryStatus, as the worker writes it
        attempts=row.attempts,
        last_status_code=row.last_status_code,
        last_error=row.last_error,
        created_at=row.created_at,
        last_attempt_at=row.last_attempt_at,
        next_attempt_at=row.next_attempt_at,
        delivered_at=row.delivered_at,
    )
