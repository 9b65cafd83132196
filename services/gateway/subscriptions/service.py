"""Webhook subscriptions: a row in `subscriptions` and two durable JetStream consumers, one on
its filter (`webhook-<id>`) and one on the notifications rules address to it
(`webhook-<id>-notify`, `system.notify.<id>`), created and deleted together. The webhooks
service delivers; every change is announced on `system.subscription.<id>.changed` (an empty core
NATS message) so that it reloads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from libs import bus, subjects, webhooks
from libs import messages as m
from libs.db.models import Delivery
from libs.db.models import Subscription as SubscriptionRow
from libs.errors import Invalid
from libs.principals import Principal
from services.gateway import deliveries, scope
from services.gateway.auth.context import Context
from services.gateway.changes import Change
from services.gateway.deliveries import SUBSCRIPTIONS, AddresseeService, DeliveryStatus
from services.gateway.pagination import page
from services.gateway.resources import require_bus
from services.gateway.subscriptions.schemas import (
    DeliveryPage,
    DeliveryView,
    Redelivery,
    Subscription,
    SubscriptionCreate,
    SubscriptionCreated,
    SubscriptionPage,
)

T = TypeVar("T")


class SubscriptionService(AddresseeService):
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
        await deliveries.check_url(
            data.url, self._settings, allow_private_targets=admin, field="$.url"
        )
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
        first = await bus.partition_first(self._js)
        consumers = (
            (
                stream,
                webhooks.consumer_config(
                    row.id, row.filter, ack_wait, batch_size, partition_first=first
                ),
            ),
            (subjects.SYSTEM_STREAM, webhooks.notify_consumer_config(row.id, ack_wait, batch_size)),
        )
        await deliveries.create(
            self._sessions, self._js, row, consumers, lambda s: _signal(s, row, "created", ctx)
        )
        return SubscriptionCreated(**_fields(row), secret=secret)

    async def get(self, subscription_id: str, principal: Principal) -> Subscription:
        async with self._sessions() as session:
            return _view(await SUBSCRIPTIONS.find(session, subscription_id, principal))

    async def list(self, limit: int, cursor: str | None, principal: Principal) -> SubscriptionPage:
        async with self._sessions() as session:
            rows = await SUBSCRIPTIONS.listed(session, principal, limit, cursor)
        return page(rows, limit, key=lambda r: r.id, view=_view, into=SubscriptionPage)

    async def delete(self, subscription_id: str, ctx: Context) -> None:
        """Remove the subscription, its consumers and its delivery records."""
        require_bus(self._nc)
        async with self._sessions.begin() as session:
            row = await SUBSCRIPTIONS.find(session, subscription_id, ctx.principal)
            consumers = (
                (subjects.check_filter(row.filter), subjects.webhook_consumer(row.id)),
                (subjects.SYSTEM_STREAM, subjects.webhook_notify_consumer(row.id)),
            )
            await deliveries.remove(session, self._js, row, consumers)
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
        async with self._sessions() as session:
            rows = await SUBSCRIPTIONS.deliveries(
                session, subscription_id, principal, status, limit, cursor
            )
        return page(rows, limit, key=lambda r: r.id, view=_delivery_view, into=DeliveryPage)

    async def redeliver(self, subscription_id: str, ctx: Context) -> Redelivery:
        """Queue every failed delivery to be sent again (`pending` without a next attempt)."""
        require_bus(self._nc)
        async with self._sessions.begin() as session:
            row = await SUBSCRIPTIONS.find(session, subscription_id, ctx.principal)
            redelivered = await deliveries.redrive_failed(session, subscription_id)
            _signal(session, row, "redelivered", ctx, redelivered)
        return Redelivery(redelivered=redelivered)


def _signal(
    session: AsyncSession,
    row: SubscriptionRow,
    change: Change,
    ctx: Context,
    redelivered: int | None = None,
) -> None:
    """The change as the audit tells it (`deliveries.Addressees.announce`)."""
    detail: dict[str, Any] = {
        "filter": row.filter,
        "url": webhooks.shown_url(row.url),
        "mode": row.mode,
    }
    if redelivered is not None:
        detail["redelivered"] = redelivered
    SUBSCRIPTIONS.announce(session, row, change, ctx, detail)


def _checked(check: Callable[[str], T], value: str, field: str) -> T:
    try:
        return check(value)
    except ValueError as exc:
        raise Invalid(str(exc), field=field) from None


def _fields(row: SubscriptionRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "filter": row.filter,
        "url": webhooks.shown_url(row.url),
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
        **deliveries.record_fields(row),
        subscription_id=row.subscription_id,
        source=row.source,  # type: ignore[arg-type]  # a Source: the column holds only what the worker writes
        event_seq=row.event_seq,
        webhook_id=row.webhook_id,
    )
