"""The webhooks service's reads and writes: subscriptions, and one `deliveries` row per
(subscription, stream sequence), updated on every attempt."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import webhooks
from libs.db.models import Delivery, Subscription
from services.webhooks.attempts import Attempted, Previous


@dataclass(frozen=True)
class Target:
    """A subscription as it is delivered; a change to any field restarts its worker."""

    id: str
    filter: str
    stream: str
    url: str
    mode: str
    secret: str


@dataclass(frozen=True)
class Known:
    """A delivery's record as found before an attempt."""

    status: str
    previous: Previous
    redriven: bool  # pending again by a user's re-drive, not by the consumer's retries


@dataclass(frozen=True)
class Redriven:
    event_seq: int
    event_id: str
    subject: str
    known: Known


class DeliveryStore:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def targets(self) -> dict[str, Target]:
        """The enabled subscriptions (the gateway checked their filters when it stored them)."""
        async with self._sessions() as session:
            rows = list(await session.scalars(select(Subscription).where(Subscription.enabled)))
        return {
            r.id: Target(r.id, r.filter, webhooks.check_filter(r.filter), r.url, r.mode, r.secret)
            for r in rows
        }

    async def exists(self, subscription_id: str) -> bool:
        async with self._sessions() as session:
            return await session.get(Subscription, subscription_id) is not None

    async def known(self, subscription_id: str, event_seq: int) -> Known | None:
        async with self._sessions() as session:
            row = await _row(session, subscription_id, event_seq)
            return _known(row) if row else None

    async def redriven(self, subscription_id: str) -> list[Redriven]:
        """Deliveries a user re-drove from the dead-letter list, oldest first."""
        query = (
            select(Delivery)
            .where(
                Delivery.subscription_id == subscription_id,
                Delivery.status == webhooks.PENDING,
                Delivery.next_attempt_at.is_(None),
            )
            .order_by(Delivery.event_seq)
        )
        async with self._sessions() as session:
            rows = await session.scalars(query)
            return [Redriven(r.event_seq, r.event_id, r.subject, _known(r)) for r in rows]

    async def record(
        self,
        subscription_id: str,
        event_seq: int,
        event_id: str,
        subject: str,
        attempted: Attempted,
    ) -> None:
        """Create or update the delivery's row (one worker per subscription writes it)."""
        async with self._sessions.begin() as session:
            row = await _row(session, subscription_id, event_seq)
            if row is None:
                row = Delivery(
                    subscription_id=subscription_id,
                    event_seq=event_seq,
                    event_id=event_id,
                    subject=subject,
                    created_at=attempted.first_attempt_at,
                )
                session.add(row)
            row.status = attempted.status
            row.attempts = attempted.attempts
            row.last_status_code = attempted.status_code
            row.last_error = attempted.error
            row.last_attempt_at = attempted.at
            row.next_attempt_at = attempted.next_attempt_at
            if attempted.status == webhooks.DELIVERED:
                row.delivered_at = attempted.at


async def _row(session: AsyncSession, subscription_id: str, event_seq: int) -> Delivery | None:
    return await session.scalar(
        select(Delivery).where(
            Delivery.subscription_id == subscription_id, Delivery.event_seq == event_seq
        )
    )


def _known(row: Delivery) -> Known:
    redriven = row.status == webhooks.PENDING and row.next_attempt_at is None
    return Known(row.status, Previous(row.attempts, row.created_at), redriven)
