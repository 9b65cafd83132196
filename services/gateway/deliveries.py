"""What webhook subscriptions and notification channels share: both are addressees that the
webhooks service delivers to (one id space, `system.notify.<id>`), each a row of a home with
durable consumers made and removed with it, and delivery records in one `deliveries` table
keyed by the addressee's id. Their slices keep what is their own (bodies, consumers, what the
audit says of them); this module holds the rest, once: the rows of the principal's homes, a
row's creation and deletion with its consumers, the change fact the webhooks service reloads
on, the check of a destination, and the delivery records: their listing, the failures and
their re-drive.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Generic, Literal, TypeVar, cast

from litestar.params import QueryParameter
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig
from nats.js.errors import NotFoundError
from sqlalchemy import CursorResult, delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import subjects, webhooks
from libs.db.models import Channel, Delivery, Subscription
from libs.errors import Conflict, Invalid, NotFound
from libs.principals import Principal
from services.gateway import scope
from services.gateway.auth.context import Context
from services.gateway.changes import Change, What, record_change
from services.gateway.pagination import decode_cursor, keyset

DeliveryStatus = Literal["pending", "delivered", "failed"]
StatusParam = Annotated[
    DeliveryStatus | None, QueryParameter(description="pending, delivered or failed")
]

A = TypeVar("A", Subscription, Channel)


@dataclass(frozen=True)
class Addressees(Generic[A]):
    """One kind of addressee: its table, and what errors and the audit call it."""

    model: type[A]
    what: What

    async def find(self, session: AsyncSession, addressee_id: str, principal: Principal) -> A:
        """The row, when it is of the principal's homes; NotFound for another home's as for
        one that does not exist."""
        row = await session.get(self.model, addressee_id)
        missing = f"{self.what} {addressee_id!r} does not exist"
        if row is None:
            raise NotFound(missing)
        scope.visible(principal, row.home, missing)
        return row

    async def listed(
        self, session: AsyncSession, principal: Principal, limit: int, cursor: str | None
    ) -> list[A]:
        """The rows of the principal's homes, by id: a page of `limit` and one more, which
        says that a next page exists (`pagination.page`)."""
        query = keyset(select(self.model), self.model.id, limit, cursor)
        return list(await session.scalars(scope.homed(principal, query, self.model.home)))

    def announce(
        self, session: AsyncSession, row: A, change: Change, ctx: Context, detail: dict[str, Any]
    ) -> None:
        """The webhooks service reloads the addressee; the recorder audits the change. In
        the change's transaction: published after its commit."""
        record_change(
            session,
            subjects.subscription_changed(row.id),
            self.what,
            row.id,
            change,
            actor=ctx.principal.actor,
            correlation_id=ctx.correlation_id,
            detail=detail,
            home=row.home,
        )

    async def deliveries(
        self,
        session: AsyncSession,
        addressee_id: str,
        principal: Principal,
        status: DeliveryStatus | None,
        limit: int,
        cursor: str | None,
    ) -> list[Delivery]:
        """The records of what needed more than one attempt, oldest first: a page of
        `limit` and one more, which says that a next page exists (`pagination.page`).
        `failed` ones are the dead letters."""
        await self.find(session, addressee_id, principal)
        query = (
            select(Delivery)
            .where(Delivery.subscription_id == addressee_id)
            .order_by(Delivery.id)
            .limit(limit + 1)
        )
        if status:
            query = query.where(Delivery.status == status)
        if cursor:
            query = query.where(Delivery.id > decode_cursor(cursor, int))
        return list(await session.scalars(query))

    async def redrive_one(
        self, session: AsyncSession, addressee_id: str, delivery_id: int
    ) -> Delivery:
        """Queue one failed delivery to be sent again, as `redrive_failed` does; NotFound
        when the addressee has no such delivery, Conflict when it has not failed."""
        record = await session.get(Delivery, delivery_id)
        if record is None or record.subscription_id != addressee_id:
            raise NotFound(f"{self.what} {addressee_id!r} has no delivery {delivery_id}")
        if record.status != webhooks.FAILED:
            raise Conflict(
                f"delivery {delivery_id} is {record.status}: only a failed one is re-driven"
            )
        record.status = webhooks.PENDING
        record.next_attempt_at = None
        await session.flush()
        return record


SUBSCRIPTIONS = Addressees(Subscription, "subscription")
CHANNELS = Addressees(Channel, "channel")


class AddresseeService:
    """What the service of a slice of addressees works with: the database, the bus (each
    addressee has consumers) and the webhooks' settings (destinations, acknowledgement)."""

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


# --- rows with their consumers ---------------------------------------------------------------


async def create(
    sessions: async_sessionmaker[AsyncSession],
    js: JetStreamContext,
    row: Subscription | Channel,
    consumers: Sequence[tuple[str, ConsumerConfig]],
    announce: Callable[[AsyncSession], None],
) -> None:
    """Store the row and make its consumers (stream, config): from now on they keep what is
    addressed to it. `announce` writes the change fact in the same transaction."""
    try:
        async with sessions.begin() as session:
            session.add(row)
            await session.flush()
            for stream, config in consumers:
                await js.add_consumer(stream, config)
            announce(session)
    except BaseException:
        # The row did not commit: a consumer without one would keep nothing useful.
        for stream, config in consumers:
            with contextlib.suppress(Exception):
                await js.delete_consumer(stream, config.durable_name or "")
        raise


async def remove(
    session: AsyncSession,
    js: JetStreamContext,
    row: Subscription | Channel,
    consumers: Sequence[tuple[str, str]],
) -> None:
    """Delete the row, its delivery records and its consumers (stream, durable name) in
    `session`'s transaction; the caller announces it there."""
    await session.execute(delete(Delivery).where(Delivery.subscription_id == row.id))
    await session.delete(row)
    await session.flush()
    for stream, durable in consumers:
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(stream, durable)


async def check_url(
    url: str,
    settings: webhooks.WebhookSettings,
    *,
    allow_private_targets: bool,
    field: str,
    show_path: bool = True,
) -> None:
    """Refuse a destination that a webhook could not reach (`libs.webhooks.check_url`),
    naming `field`, and the URL as it may be shown (`libs.webhooks.shown_url`)."""
    try:
        # getaddrinfo blocks: resolve in a thread.
        await asyncio.to_thread(
            webhooks.check_url,
            url,
            settings.allow_nets,
            allow_private_targets=allow_private_targets,
        )
    except ValueError as exc:
        shown = webhooks.shown_url(url, path=show_path)
        raise Invalid(f"{shown!r}: {exc}", field=field) from None


# --- delivery records ------------------------------------------------------------------------


async def redrive_failed(session: AsyncSession, addressee_id: str) -> int:
    """Queue every failed delivery to be sent again, from the stream (`pending` without a
    next attempt: the webhooks service's re-drive sends it); how many."""
    result = await session.execute(
        update(Delivery)
        .where(Delivery.subscription_id == addressee_id, Delivery.status == webhooks.FAILED)
        .values(status=webhooks.PENDING, next_attempt_at=None)
    )
    # An UPDATE's result is a CursorResult: it counts the rows it changed.
    return cast(CursorResult[Any], result).rowcount or 0


def record_fields(row: Delivery) -> dict[str, Any]:
    """What every view of a delivery record says (the addressee's id each names its way)."""
    return {
        "id": row.id,
        "event_id": row.event_id,
        "subject": row.subject,
        "status": row.status,  # a DeliveryStatus, as the webhooks service writes it
        "attempts": row.attempts,
        "last_status_code": row.last_status_code,
        "last_error": row.last_error,
        "created_at": row.created_at,
        "last_attempt_at": row.last_attempt_at,
        "next_attempt_at": row.next_attempt_at,
        "delivered_at": row.delivered_at,
    }
