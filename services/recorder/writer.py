"""One durable consumer per stream, run by the consumer runtime (`libs.consumer`): each
message decoded into its rows, each batch written in one transaction, then acked."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

import msgspec
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig
from prometheus_client import Counter, Histogram
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from libs import bus, commands, subjects, tracing
from libs.consumer import Consumer, Dead, Delivery, Item, Retry, Verdict
from libs.db import audit
from libs.db.engine import insert_ignoring_duplicates, refused
from libs.db.models import RuleRun
from services.recorder import bulk
from services.recorder import rows as to_rows

log = logging.getLogger(__name__)

BATCH = bus.RECORDER_BATCH
# Every batch costs a transaction whatever its size: at a steady trickle, wait this long after
# a batch's first message for more (history and audit rows are read by people, not machines).
LINGER_S = 0.1
RECORDED = Counter("smarthome_recorder_messages_total", "Messages recorded", ["stream", "outcome"])
# Finer than the defaults: a batch takes milliseconds, and its p50/p99 are what to watch.
WRITE_BUCKETS = (
    0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0,
)  # fmt: skip
BATCH_SECONDS = Histogram(
    "smarthome_recorder_batch_seconds",
    "Time to write one batch, commit included",
    ["stream"],
    buckets=WRITE_BUCKETS,
)

SOURCES = bus.RECORDER_SOURCES


def convert(stream: str, msg: Delivery, rows: to_rows.Rows) -> None:
    src = (stream, msg.seq)
    if stream == subjects.EVENTS_STREAM:
        to_rows.from_event(rows, msg.subject, msg.data, src, msg.time)
    elif stream == subjects.COMMANDS_STREAM:
        to_rows.from_command(rows, msg.data, src)
    else:
        to_rows.from_system(rows, msg.subject, msg.data, src)


def merged(items: list[Item[to_rows.Rows]]) -> to_rows.Rows:
    """The rows of a batch, in stream order (a later write of a command wins)."""
    rows = to_rows.Rows()
    for item in items:
        one = item.value
        rows.history += one.history
        rows.audit += one.audit
        rows.rule_runs += one.rule_runs
        rows.commands.update(one.commands)
    return rows


class StreamRecorder:
    def __init__(self, nc: NATS, engine: AsyncEngine, stream: str) -> None:
        self._sessions: async_sessionmaker[AsyncSession] = async_sessionmaker(engine)
        self._stream = stream
        # Built once (their cache keys with them), not per batch.
        self._history = bulk.HistoryWriter(engine)
        self._insert_runs = insert_ignoring_duplicates(engine, RuleRun.__table__)
        self._record_commands = commands.record_statement(engine)
        self.consumer: Consumer[to_rows.Rows] = Consumer(
            nc,
            stream,
            _config(stream),
            self.decode,
            self.handle,
            batch=BATCH,
            linger=LINGER_S,
        )

    async def run(self, stop: asyncio.Event) -> None:
        await self.consumer.run(stop)

    def decode(self, msg: Delivery) -> to_rows.Rows | None:
        """The message's rows; None (skipped) for one that has none to give."""
        rows = to_rows.Rows()
        try:
            convert(self._stream, msg, rows)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            # The actors dead-letter what devices send malformed; here it is only skipped.
            log.info("not recorded %s: %s", msg.subject, exc)
            RECORDED.labels(self._stream, "skipped").inc()
            return None
        return rows

    async def handle(self, items: list[Item[to_rows.Rows]]) -> Mapping[int, Verdict]:
        """Write the batch. A batch the database refuses (not one it cannot take now) is
        written message by message, and what it refuses of those is dead-lettered with the
        reason: one bad message never stops the recorder."""
        try:
            await self._written(items)
            return {}
        except DBAPIError as exc:  # refused: `_write` raises Retry for anything else
            log.warning("%s batch refused, writing it one by one: %s", self._stream, _why(exc))
        verdicts: dict[int, Verdict] = {}
        for item in items:
            try:
                await self._written([item])
            except DBAPIError as exc:
                RECORDED.labels(self._stream, "dead-lettered").inc()
                reason = f"refused by the database: {_why(exc)}"
                verdicts[item.delivery.seq] = Dead(reason, "refused")
        return verdicts

    async def _written(self, items: list[Item[to_rows.Rows]]) -> None:
        """Write `items` (see `_write`) and count them once written (a span for the batch,
        in the trace of its messages when they share one, else linked to each)."""
        with (
            tracing.batch("recorder write", (i.traceparent for i in items), stream=self._stream),
            BATCH_SECONDS.labels(self._stream).time(),
        ):
            await self._write(merged(items))
        RECORDED.labels(self._stream, "recorded").inc(len(items))

    async def _write(self, rows: to_rows.Rows) -> None:
        """Insert the batch (a redelivered message inserts nothing twice), its audit rows
        appended to the chain in stream order; raise what the database refuses (`refused`),
        `Retry` while it is down."""
        if rows.empty:  # a stale transition, say: no transaction for nothing
            return
        try:
            async with self._sessions.begin() as session:
                # One statement a table (history: `bulk`); a redelivered message's rows are
                # ignored, its history's hours marked pending again.
                if rows.history:
                    await self._history.write(session, rows.history)
                if rows.rule_runs:
                    await session.execute(self._insert_runs, rows.rule_runs)
                if rows.commands:
                    await session.execute(self._record_commands, list(rows.commands.values()))
                if rows.audit:  # last: the chain's lock is held from here to the commit
                    await session.run_sync(audit.append, rows.audit)
        except Exception as exc:
            if refused(exc):
                raise
            raise Retry(f"recorder write failed: {exc!r}") from exc


def _config(stream: str) -> ConsumerConfig:
    """The recorder's consumer of `stream`, as the gateway provisions it."""
    durable = bus.recorder_durable(stream)
    for s, config in bus.CONSUMERS:
        if s == stream and config.durable_name == durable:
            return config
    raise LookupError(durable)


def _why(exc: Exception) -> str:
    """The database's own words, first line (not the statement and its parameters)."""
    cause = getattr(exc, "orig", None) or exc
    text = str(cause).strip()
    return text.splitlines()[0][:300] if text else type(cause).__name__
