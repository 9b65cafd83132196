"""The transactional outbox: a change in the database and the fact that announces it are one.

`add` writes the fact into the `outbox` table in the transaction of the change; a `Relay`
publishes committed rows in order, with the row's id as `Nats-Msg-Id`, and marks them sent.
A rolled-back transaction leaves no row, so nothing is published; a relay that dies between
publishing and marking sends the row again, and JetStream drops the copy (same msg id,
inside the stream's duplicate window).

The relay is woken right after a commit that wrote a row (the session's `after_commit`), and
polls besides for rows that another process committed or a crashed one left behind. Relays
of several gateways take turns: on Postgres one at a time holds a transaction-scoped
advisory lock while it publishes and marks a batch, so rows go out once and in order; on
SQLite (one machine, one gateway) a second relay could resend a row, which the msg id makes
harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from datetime import timedelta

import msgspec
from nats.js import JetStreamContext
from prometheus_client import Counter, Histogram
from sqlalchemy import delete, event, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import bus
from libs import messages as m
from libs.db.models import OutboxMessage

log = logging.getLogger(__name__)

# `Session.info` keys: the relay to wake after a commit (set on the sessionmaker by
# `Relay.watch`), and whether this session already wakes it.
WAKE = "smarthome.outbox.wake"
_WAKES = "smarthome.outbox.wakes"
# Any constant shared by every relay: the advisory lock that makes one publish at a time.
ADVISORY_LOCK = 0x5A0B0C5

SENT = Counter("smarthome_outbox_sent_total", "Outbox facts published")
LATENCY = Histogram(
    "smarthome_outbox_latency_seconds",
    "From a fact's write into the outbox to its publish being acknowledged",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)


def add(
    session: AsyncSession,
    subject: str,
    message: msgspec.Struct | bytes,
    *,
    headers: Mapping[str, str] | None = None,
    msg_id: str | None = None,
) -> str:
    """Write `message` for `subject` into the outbox in `session`'s transaction: it is
    published after that commits, never if it rolls back. Returns its id, its msg id:
    `msg_id` when given (a device event's own id, as devices publish theirs), else new."""
    row = OutboxMessage(
        id=msg_id or m.new_id(),
        subject=subject,
        payload=message if isinstance(message, bytes) else msgspec.json.encode(message),
        headers=dict(headers) if headers else None,
        created_at=m.now(),
    )
    session.add(row)
    wake: Callable[[], None] | None = session.info.get(WAKE)
    if wake is not None and not session.info.get(_WAKES):
        session.info[_WAKES] = True
        event.listen(session.sync_session, "after_commit", lambda _: wake())
    return row.id


class Relay:
    """Publishes the outbox's committed rows; `run` until cancelled or `stop`ped."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        js: JetStreamContext,
        *,
        poll_s: float = 1.0,
        batch: int = 100,
        keep_sent_s: float = 600.0,
    ) -> None:
        self._sessions = sessions
        self._js = js
        self._poll_s = poll_s
        self._batch = batch
        self._keep_sent = timedelta(seconds=keep_sent_s)
        self._woken = asyncio.Event()
        self._stopping = False
        self._purged_at = 0.0

    def wake(self) -> None:
        self._woken.set()

    def watch(self) -> Callable[[], None]:
        """Be woken after every commit of a session of `sessions` that wrote a fact;
        returns the callable that undoes it."""
        info = dict(self._sessions.kw.get("info") or {})
        self._sessions.configure(info={**info, WAKE: self.wake})
        return lambda: self._sessions.configure(info=info)

    async def run(self) -> None:
        delay = 0.0
        while True:
            self._woken.clear()
            try:
                published = await self.relay_once()
                await self._purge()
                delay = 0.0
            except Exception as exc:  # the bus or the database away: the rows wait
                delay = min(max(delay * 2, 0.1), self._poll_s * 5)
                log.warning("outbox relay: %s; again in %.1fs", exc, delay)
                published = 0
            if self._stopping:
                return
            if published is None:  # another relay is at it: look again soon
                await asyncio.sleep(0.02)
                continue
            if published >= self._batch:
                continue  # there may be more
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), delay or self._poll_s)

    async def stop(self, task: asyncio.Task[None], timeout: float = 5.0) -> None:
        """Publish what is committed, then end `task` (the one running `run`)."""
        self._stopping = True
        self.wake()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def relay_once(self) -> int | None:
        """Publish and mark one batch of unsent rows, oldest first: how many, or None when
        another relay holds the turn."""
        async with self._sessions.begin() as session:
            if not await _take_turn(session):
                return None
            rows = list(
                await session.scalars(
                    select(OutboxMessage)
                    .where(OutboxMessage.sent_at.is_(None))
                    .order_by(OutboxMessage.seq)
                    .limit(self._batch)
                )
            )
            sent: list[int] = []
            failure: Exception | None = None
            for row in rows:
                headers = {**(row.headers or {}), bus.MSG_ID: row.id}
                try:
                    with bus.storage_refusals():
                        await self._js.publish(row.subject, row.payload, headers=headers)
                except Exception as exc:  # the rest wait: their order is kept
                    failure = exc
                    break
                sent.append(row.seq)
                LATENCY.observe(max(0.0, (m.now() - row.created_at).total_seconds()))
            # Those published are marked even when a later one failed: the next round starts
            # after them (a mark that does not commit only costs a resend, dropped by the bus).
            if sent:
                await session.execute(
                    update(OutboxMessage).where(OutboxMessage.seq.in_(sent)).values(sent_at=m.now())
                )
        SENT.inc(len(sent))
        if failure is not None:
            raise failure
        return len(sent)

    async def _purge(self) -> None:
        """Forget rows sent more than `keep_sent_s` ago, about once a minute: kept that long
        to be looked at, never needed again (a resend after that would not be a duplicate
        the bus can recognise, so nothing may resend them)."""
        if time.monotonic() - self._purged_at < 60.0:
            return
        self._purged_at = time.monotonic()
        async with self._sessions.begin() as session:
            await session.execute(
                delete(OutboxMessage).where(OutboxMessage.sent_at < m.now() - self._keep_sent)
            )


async def _take_turn(session: AsyncSession) -> bool:
    """On Postgres: whether this transaction got the relays' lock (released at its end)."""
    if session.get_bind().dialect.name != "postgresql":
        return True
    lock = text("SELECT pg_try_advisory_xact_lock(:key)").bindparams(key=ADVISORY_LOCK)
    return bool(await session.scalar(lock))
