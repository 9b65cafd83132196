"""The webhooks service's reads and writes: subscriptions, their delivered counters, and a
`deliveries` row per (subscription, source, stream sequence) for each event that needed more
than one attempt, updated on every attempt. A first-attempt success writes nothing but the
counter, and that in batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import msgspec
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import messages as m
from libs import subjects, webhooks
from libs.db.models import Channel, Delivery, Subscription
from services.webhooks.attempts import Attempted, Previous


@dataclass(frozen=True)
class Target:
    """A subscription as it is delivered; a change to any field restarts its workers."""

    id: str
    filter: str
    stream: str
    url: str
    mode: str
    secret: str
    batch_size: int | None = None
    # May it reach private, loopback or link-local addresses inside the allow-nets (its
    # creator is an administrator)? Public addresses it may reach in any case.
    allow_private_targets: bool = False
    # The home whose messages it gets (`libs.homes`); None: every message of its filter.
    home: str | None = None
    # A notification channel's settings: it gets the notifications addressed to it only,
    # rendered for people (`channels.py`), and has no filter of its own.
    channel: m.ChannelConfig | None = None


@dataclass(frozen=True)
class Known:
    """A delivery's record as found before an attempt."""

    status: str
    previous: Previous
    redriven: bool  # pending again by a user's re-drive, not by the worker's retries
    next_attempt_at: datetime | None
    webhook_id: str | None


@dataclass(frozen=True)
class Event:
    """What a record says of the event it is about."""

    seq: int
    event_id: str
    subject: str


@dataclass(frozen=True)
class Redriven:
    event: Event
    known: Known


class DeliveryStore:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def targets(self) -> dict[str, Target]:
        """The enabled subscriptions (the gateway checked their filters when it stored them)
        and notification channels."""
        async with self._sessions() as session:
            rows = list(await session.scalars(select(Subscription).where(Subscription.enabled)))
            channels = list(await session.scalars(select(Channel).where(Channel.enabled)))
        targets = {c.id: _channel_target(c) for c in channels}
        return targets | {
            r.id: Target(
                r.id,
                r.filter,
                subjects.check_filter(r.filter),
                r.url,
                r.mode,
                r.secret,
                r.batch_size,
                # Whether its creator was an administrator, recorded when it was stored: a
                # name that resolves into the allow-nets later leads there for them only.
                allow_private_targets=r.private_targets,
                home=r.home,
            )
            for r in rows
        }

    async def exists(self, subscription_id: str) -> bool:
        """Whether a subscription or a notification channel has this id."""
        async with self._sessions() as session:
            if await session.get(Subscription, subscription_id) is not None:
                return True
            return await session.get(Channel, subscription_id) is not None

    async def open_records(
        self, subscription_id: str, source: str, after_seq: int
    ) -> dict[int, Known]:
        """The records of events after `after_seq` (the consumer's ack floor): those a worker
        may meet again, being retried or settled just before a restart."""
        query = select(Delivery).where(
            Delivery.subscription_id == subscription_id,
            Delivery.source == source,
            Delivery.event_seq > after_seq,
        )
        async with self._sessions() as session:
            return {r.event_seq: _known(r) for r in await session.scalars(query)}

    async def redriven(self, subscription_id: str, source: str) -> list[Redriven]:
        """Deliveries a user re-drove from the dead-letter list, oldest first."""
        query = (
            select(Delivery)
            .where(
                Delivery.subscription_id == subscription_id,
                Delivery.source == source,
                Delivery.status == webhooks.PENDING,
                Delivery.next_attempt_at.is_(None),
            )
            .order_by(Delivery.event_seq)
        )
        async with self._sessions() as session:
            rows = await session.scalars(query)
            return [Redriven(Event(r.event_seq, r.event_id, r.subject), _known(r)) for r in rows]

    async def record(
        self,
        subscription_id: str,
        source: str,
        events: Sequence[Event],
        webhook_id: str | None,
        attempted: Attempted,
    ) -> dict[int, Known]:
        """Create or update the rows of the events one request carried (one worker per
        subscription and source writes them); what they say now."""
        seqs = [e.seq for e in events]
        async with self._sessions.begin() as session:
            rows = {
                r.event_seq: r
                for r in await session.scalars(
                    select(Delivery).where(
                        Delivery.subscription_id == subscription_id,
                        Delivery.source == source,
                        Delivery.event_seq.in_(seqs),
                    )
                )
            }
            for event in events:
                row = rows.get(event.seq)
                if row is None:
                    row = rows[event.seq] = Delivery(
                        subscription_id=subscription_id,
                        source=source,
                        event_seq=event.seq,
                        event_id=event.event_id,
                        subject=event.subject,
                        created_at=attempted.first_attempt_at,
                    )
                    session.add(row)
                row.webhook_id = webhook_id
                row.status = attempted.status
                row.attempts = attempted.attempts
                row.last_status_code = attempted.status_code
                row.last_error = attempted.error
                row.last_attempt_at = attempted.at
                row.next_attempt_at = attempted.next_attempt_at
                if attempted.status == webhooks.DELIVERED:
                    row.delivered_at = attempted.at
            await session.flush()
            return {seq: _known(row) for seq, row in rows.items()}

    async def count_delivered(self, subscription_id: str, events: int, at: datetime) -> None:
        """Add `events` delivered to the subscription's (or the channel's) counter."""
        async with self._sessions.begin() as session:
            for table in (Subscription, Channel):
                await session.execute(
                    update(table)
                    .where(table.id == subscription_id)
                    .values(delivered_count=table.delivered_count + events, last_delivered_at=at)
                )


def _channel_target(row: Channel) -> Target:
    """A channel is delivered like a subscription that reads its notifications only."""
    return Target(
        row.id,
        subjects.notification(row.id),
        subjects.SYSTEM_STREAM,
        "",
        "structured",
        "",
        allow_private_targets=row.private_targets,
        home=row.home,
        channel=msgspec.convert(row.config, m.ChannelConfig),
    )


def _known(row: Delivery) -> Known:
    redriven = row.status == webhooks.PENDING and row.next_attempt_at is None
    return Known(
        row.status,
        Previous(row.attempts, row.created_at),
        redriven,
        row.next_attempt_at,
        row.webhook_id,
    )
