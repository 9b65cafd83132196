"""Webhook subscriptions: a row in `subscriptions` and two durable JetStream consumers, one on
its filter (`webhook-<id>`) and one on the notifications rules address to it
(`webhook-<id>-notify`, `system.notify.<id>`), created and deleted together. The webhooks
service delivers; every change is announced on `system.subscription.<id>.changed` (an empty core
NATS message) so that it reloads.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import messages as m
from libs import subjects, webhooks
from libs.db.models import Delivery
from libs.db.models import Subscription as SubscriptionRow
from libs.errors import Invalid, NotFound
from libs.principals import Principal
from services.gateway import scope
from services.gateway.auth.context import Context
from services.gateway.changes import Change, record_change
from services.gateway.pagination import decode_cursor, keyset, page
from services.gateway.resources import require_bus
from services.gateway.subscriptions.schemas import (
    DeliveryPage,
    DeliveryStatus,
    DeliveryView,
    Redelivery,
    Subscription,
    SubscriptionCreate,
    SubscriptionCreated,
    SubscriptionPage,
)

T = TypeVar("T")


class SubscriptionService:
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

    async def create(
        self, data: SubscriptionCreate, ctx: Context, *, admin: bool
    ) -> SubscriptionCreated:
        """Store the subscription and create its consumer: events from now on are kept for it.
        Its URL may lead to a private, loopback or link-local address inside the allow-nets
        only when `admin` (the principal is an administrator); to a public one in any case.
        It receives the messages of its home only (`libs.homes`); a resident's has one."""
        stream = _checked(subjects.check_filter, data.filter, "$.filter")
        home = scope.home_for(ctx.principal, data.home, "$.home")
        if stream == subjects.DEADLETTER_STREAM and not ctx.principal.is_admin:
            raise Invalid("dead letters are for administrators", field="$.filter")
        if data.batch_size is not None and data.mode != "batched":
            raise Invalid(
                f"batch_size is for mode `batched` only (mode is `{data.mode}`)",
                field="$.batch_size",
            )
        await _checked_url(data.url, self._settings.allow_nets, allow_private_targets=admin)
        secret = data.secret or webhooks.new_secret()
        _checked(webhooks.secret_key, secret, "$.secret")
        require_bus(self._nc)
        batch_size = (
            data.batch_size or webhooks.DEFAULT_BATCH_SIZE if data.mode == "batched" else None
        )
        row = SubscriptionRow(
            id=m.new_id(),
            filter=data.filter,
            url=data.url,
            mode=data.mode,
            batch_size=batch_size,
            secret=secret,
            enabled=True,
            created_by=ctx.principal.actor,
            home=home,
            private_targets=admin,
            created_at=m.now(),
            delivered_count=0,
        )
        ack_wait = self._settings.ack_wait_s
        consumers = (
            (stream, webhooks.consumer_config(row.id, row.filter, ack_wait, batch_size)),
            (subjects.SYSTEM_STREAM, webhooks.notify_consumer_config(row.id, ack_wait, batch_size)),
        )
        try:
            async with self._sessions.begin() as session:
                session.add(row)
                await session.flush()
                for consumer_stream, config in consumers:
                    await self._js.add_consumer(consumer_stream, config)
                _signal(session, row, "created", ctx)
        except BaseException:
            # The row did not commit: a consumer without one would keep nothing useful.
            for consumer_stream, config in consumers:
                with contextlib.suppress(Exception):
                    await self._js.delete_consumer(consumer_stream, config.durable_name)
            raise
        return SubscriptionCreated(**_fields(row), secret=secret)

    async def get(self, subscription_id: str, principal: Principal) -> Subscription:
        async with self._sessions() as session:
            return _view(await self._row(session, subscription_id, principal))

    async def list(self, limit: int, cursor: str | None, principal: Principal) -> SubscriptionPage:
        query = keyset(select(SubscriptionRow), SubscriptionRow.id, limit, cursor)
        query = scope.homed(principal, query, SubscriptionRow.home)
        async with self._sessions() as session:
            rows = list(await session.scalars(query))
        return page(rows, limit, key=lambda r: r.id, view=_view, into=SubscriptionPage)

    async def delete(self, subscription_id: str, ctx: Context) -> None:
        """Remove the subscription, its consumers and its delivery records."""
        require_bus(self._nc)
        async with self._sessions.begin() as session:
            row = await self._row(session, subscription_id, ctx.principal)
            stream = subjects.check_filter(row.filter)
            await session.execute(delete(Delivery).where(Delivery.subscription_id == row.id))
            await session.delete(row)
            await session.flush()
            with contextlib.suppress(NotFoundError):
                await self._js.delete_consumer(stream, subjects.webhook_consumer(row.id))
            with contextlib.suppress(NotFoundError):
                await self._js.delete_consumer(
                    subjects.SYSTEM_STREAM, subjects.webhook_notify_consumer(row.id)
                )
            _signal(session, row, "deleted", ctx)

    async def deliveries(
        self,
        subscription_id: str,
        status: DeliveryStatus | None,
        limit: int,
        cursor: str | None,
        principal: Principal,
    ) -> DeliveryPage:
        """The subscription's deliveries that needed more than one attempt, oldest first;
        `failed` ones are the dead letters."""
        query = (
            select(Delivery)
            .where(Delivery.subscription_id == subscription_id)
            .order_by(Delivery.id)
            .limit(limit + 1)
        )
        if status:
            query = query.where(Delivery.status == status)
        if cursor:
            query = query.where(Delivery.id > decode_cursor(cursor, int))
        async with self._sessions() as session:
            await self._row(session, subscription_id, principal)
            rows = list(await session.scalars(query))
        return page(rows, limit, key=lambda r: r.id, view=_delivery_view, into=DeliveryPage)

    async def redeliver(self, subscription_id: str, ctx: Context) -> Redelivery:
        """Queue every failed delivery to be sent again (`pending` without a next attempt)."""
        require_bus(self._nc)
        async with self._sessions.begin() as session:
            row = await self._row(session, subscription_id, ctx.principal)
            result = await session.execute(
                update(Delivery)
                .where(
                    Delivery.subscription_id == subscription_id,
                    Delivery.status == webhooks.FAILED,
                )
                .values(status=webhooks.PENDING, next_attempt_at=None)
            )
            _signal(session, row, "redelivered", ctx, result.rowcount or 0)
        return Redelivery(redelivered=result.rowcount or 0)

    async def _row(
        self, session: AsyncSession, subscription_id: str, principal: Principal
    ) -> SubscriptionRow:
        row = await session.get(SubscriptionRow, subscription_id)
        missing = f"subscription {subscription_id!r} does not exist"
        if row is None:
            raise NotFound(missing)
        scope.visible(principal, row.home, missing)
        return row


def _signal(
    session: AsyncSession,
    row: SubscriptionRow,
    change: Change,
    ctx: Context,
    redelivered: int | None = None,
) -> None:
    """The webhooks service reloads the subscription; the recorder audits the change. In the
    change's transaction: published after its commit."""
    detail = {"filter": row.filter, "url": _without_secrets(row.url), "mode": row.mode}
    if redelivered is not None:
        detail["redelivered"] = redelivered
    record_change(
        session,
        subjects.subscription_changed(row.id),
        "subscription",
        row.id,
        change,
        actor=ctx.principal.actor,
        correlation_id=ctx.correlation_id,
        detail=detail,
        home=row.home,
    )


def _checked(check: Callable[[str], T], value: str, field: str) -> T:
    try:
        return check(value)
    except ValueError as exc:
        raise Invalid(str(exc), field=field) from None


async def _checked_url(
    url: str, nets: tuple[webhooks.IPNetwork, ...], *, allow_private_targets: bool
) -> None:
    # getaddrinfo blocks: resolve in a thread.
    try:
        await asyncio.to_thread(
            webhooks.check_url, url, nets, allow_private_targets=allow_private_targets
        )
    except ValueError as exc:
        raise Invalid(f"{_without_secrets(url)!r}: {exc}", field="$.url") from None


def _without_secrets(url: str) -> str:
    """What answers and the audit show of a URL: no user info, query or fragment (tokens
    hide there)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    with contextlib.suppress(ValueError):  # a port that is no number is left out
        if parts.port is not None:
            netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _fields(row: SubscriptionRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "filter": row.filter,
        "url": _without_secrets(row.url),
        "mode": row.mode,
        "batch_size": row.batch_size,
        "enabled": row.enabled,
        "created_by": row.created_by,
        "created_at": row.created_at,
        "delivered": row.delivered_count or 0,
        "last_delivered_at": row.last_delivered_at,
        "home": row.home,
    }


def _view(row: SubscriptionRow) -> Subscription:
    return Subscription(**_fields(row))


def _delivery_view(row: Delivery) -> DeliveryView:
    return DeliveryView(
        id=row.id,
        subscription_id=row.subscription_id,
        source=row.source,  # type: ignore[arg-type]  # a Source: the column holds only what the worker writes
        event_seq=row.event_seq,
        event_id=row.event_id,
        webhook_id=row.webhook_id,
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
