"""One durable consumer per stream; each fetched batch is one transaction, then acked."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import NamedTuple

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from prometheus_client import Counter
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from libs import bus, commands, runtime, subjects
from libs import messages as m
from libs.db.engine import insert_ignoring_duplicates, refused
from libs.db.models import AuditEntry, HistoryEntry, RuleRun
from libs.pull import Gaps
from services.recorder import rollup
from services.recorder import rows as to_rows

log = logging.getLogger(__name__)

BATCH = bus.RECORDER_BATCH
RECORDED = Counter("smarthome_recorder_messages_total", "Messages recorded", ["stream", "outcome"])

SOURCES = bus.RECORDER_SOURCES


class Stored(NamedTuple):
    """A message as the recorder needs it, delivered by its consumer or read by sequence."""

    subject: str
    data: bytes
    seq: int
    time: datetime

    @classmethod
    def delivered(cls, msg: Msg) -> Stored:
        meta = msg.metadata
        return cls(msg.subject, msg.data, meta.sequence.stream, meta.timestamp)

    @classmethod
    def read(cls, raw: RawStreamMsg) -> Stored:
        return cls(raw.subject or "", raw.data or b"", raw.seq or 0, raw.time or m.now())


def convert(stream: str, msg: Stored, rows: to_rows.Rows) -> None:
    src = (stream, msg.seq)
    if stream == subjects.EVENTS_STREAM:
        to_rows.from_event(rows, msg.subject, msg.data, src, msg.time)
    elif stream == subjects.COMMANDS_STREAM:
        to_rows.from_command(rows, msg.data, src)
    else:
        to_rows.from_system(rows, msg.subject, msg.data, src)


class StreamRecorder:
    def __init__(self, js: JetStreamContext, engine: AsyncEngine, stream: str) -> None:
        self._js = js
        self._engine = engine
        self._sessions: async_sessionmaker[AsyncSession] = async_sessionmaker(engine)
        self._stream = stream
        self._durable = bus.recorder_durable(stream)

    async def run(self, stop: asyncio.Event) -> None:
        await self._recover(stop)
        sub = await self._js.pull_subscribe_bind(self._durable, stream=self._stream)
        gaps = Gaps()
        try:
            while not stop.is_set():
                try:
                    msgs = await sub.fetch(BATCH, timeout=1.0)
                except TimeoutError:  # nats-py raises asyncio.TimeoutError here
                    continue
                if not msgs:
                    continue  # nats-py can answer a fetch with nothing (e.g. after a reconnect)
                for msg in msgs:
                    gaps.note(msg)
                if gaps.take():  # lost with a connection: this batch's ack would ack them unseen
                    log.info("%s deliveries never received", self._durable)
                    await self._recover(stop)
                stored = [Stored.delivered(msg) for msg in msgs]
                if await self._record(stored, msgs, stop):
                    await msgs[-1].ack()  # AckPolicy.ALL: the whole batch
        finally:
            await sub.unsubscribe()  # a pull subscription left to drain() blocks it

    async def _recover(self, stop: asyncio.Event) -> None:
        """Write what a previous recorder (or this one, on a lost connection) was handed and
        did not ack (`bus.unacked`) before anything newer; writing them again is harmless
        (rows are keyed by stream sequence)."""
        left: list[Stored] = []

        async def read() -> None:
            raws = await bus.unacked(self._js, self._stream, self._durable)
            left[:] = [Stored.read(raw) for raw in raws]

        if not await runtime.retry_until_stopped(read, stop, "reading un-acked messages"):
            return
        if left and await self._record(left, [], stop):
            log.info("recorded %d %s messages a previous recorder left", len(left), self._stream)

    def _convert(self, msgs: list[Stored]) -> tuple[to_rows.Rows, int]:
        """The rows of `msgs`, and how many of them have rows (the others are skipped)."""
        rows = to_rows.Rows()
        converted = 0
        for msg in msgs:
            try:
                convert(self._stream, msg, rows)
                converted += 1
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
                # The actors dead-letter what devices send malformed; here it is only skipped.
                log.info("not recorded %s: %s", msg.subject, exc)
                RECORDED.labels(self._stream, "skipped").inc()
        return rows, converted

    async def _written(self, msgs: list[Stored], delivered: list[Msg], stop: asyncio.Event) -> bool:
        """Write `msgs` (see `_write`) and count them once written."""
        rows, converted = self._convert(msgs)
        if not await self._write(rows, delivered, stop):
            return False
        RECORDED.labels(self._stream, "recorded").inc(converted)
        return True

    async def _record(self, stored: list[Stored], msgs: list[Msg], stop: asyncio.Event) -> bool:
        """Write the batch; False if stopped first. A batch the database refuses (not one it
        cannot take now) is written message by message, and what it refuses of those is
        dead-lettered with the reason: one bad message never stops the recorder."""
        try:
            return await self._written(stored, msgs, stop)
        except DBAPIError as exc:  # refused: `_write` retries anything else
            log.warning("%s batch refused, writing it one by one: %s", self._stream, _why(exc))
        for one in stored:
            try:
                if not await self._written([one], msgs, stop):
                    return False
            except DBAPIError as exc:
                RECORDED.labels(self._stream, "dead-lettered").inc()
                if not await self._dead_letter(one, f"refused by the database: {_why(exc)}", stop):
                    return False
        return True

    async def _dead_letter(self, one: Stored, reason: str, stop: asyncio.Event) -> bool:
        async def send() -> None:
            origin = (self._stream, one.seq)
            await bus.dead_letter_stored(
                self._js, one.subject, one.data, origin, reason, self._durable
            )

        return await runtime.retry_until_stopped(send, stop, "dead-lettering")

    async def _write(self, rows: to_rows.Rows, msgs: list[Msg], stop: asyncio.Event) -> bool:
        """Insert the batch (a redelivered message inserts nothing twice); retry while down,
        raise what the database refuses (`refused`)."""

        async def attempt() -> None:
            async with self._sessions.begin() as session:
                for table, values in (
                    (HistoryEntry.__table__, rows.history),
                    (AuditEntry.__table__, rows.audit),
                    (RuleRun.__table__, rows.rule_runs),
                ):
                    if values:
                        insert = insert_ignoring_duplicates(self._engine, table)
                        await session.execute(insert, values)
                if rows.history:  # its hours' statistics are rolled up again
                    mark = rollup.mark_pending(self._engine)
                    await session.execute(mark, rollup.pending_hours(rows.history))
                if rows.commands:
                    record = commands.record_statement(self._engine)
                    await session.execute(record, list(rows.commands.values()))

        async def still_working() -> None:
            for msg in msgs:
                await msg.in_progress()

        return await runtime.retry_until_stopped(
            attempt, stop, "recorder write", still_working, final=refused
        )


def _why(exc: Exception) -> str:
    """The database's own words, first line (not the statement and its parameters)."""
    cause = getattr(exc, "orig", None) or exc
    text = str(cause).strip()
    return text.splitlines()[0][:300] if text else type(cause).__name__
