"""The events consumer of a partition: read only while event-triggered rules exist, on
their subjects, through the consumer runtime (`libs.consumer`).

When the event rules change, the running consumer stops between batches (its last batch
acked), the durable consumer is re-filtered (it keeps its position) or deleted, and a new
runtime binds it; what the last reader left un-acked is recovered at bind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import BadRequestError, NotFoundError

from libs import messages as m
from libs import subjects
from libs.consumer import Consumer, Delivery, Handler

log = logging.getLogger(__name__)

FETCH_BATCH = 256


def decode_event(delivery: Delivery) -> m.CloudEvent | None:
    """An event, or None for a malformed one: the actors dead-letter it, not the rules."""
    try:
        return m.cloud_event_decoder.decode(delivery.data)
    except ValueError:  # msgspec's DecodeError and ValidationError
        return None


def disjoint(patterns: Iterable[str]) -> tuple[str, ...]:
    """Drop patterns another one already covers (the server refuses overlapping filters)."""
    found = sorted(set(patterns))
    return tuple(p for p in found if not any(o != p and subjects.matches(o, p) for o in found))


class EventReader:
    def __init__(self, nc: NATS, durable: str, handle: Handler[m.CloudEvent]) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._durable = durable
        self._handle = handle
        self._wanted: tuple[str, ...] = ()
        self._changed = asyncio.Event()
        self._consumer: Consumer[m.CloudEvent] | None = None

    def want(self, patterns: Iterable[str]) -> None:
        """Read these subjects from now on (none: no events consumer at all)."""
        wanted = disjoint(patterns)
        if wanted != self._wanted:
            self._wanted = wanted
            self._changed.set()

    @property
    def bound(self) -> bool:
        """Bound, or nothing to read."""
        return not self._wanted or (self._consumer is not None and self._consumer.bound.is_set())

    async def run(self, quit: asyncio.Event) -> None:
        applied: tuple[str, ...] | None = None  # whatever the last owner left: provision anew
        while not quit.is_set():
            self._changed.clear()
            wanted = self._wanted
            if wanted != applied:
                await self._provision(wanted)
                applied = wanted
            if wanted:
                await self._read(wanted, quit)
            else:
                await _first(quit, self._changed)

    async def _read(self, wanted: tuple[str, ...], quit: asyncio.Event) -> None:
        stop = asyncio.Event()
        self._consumer = Consumer(
            self._nc,
            subjects.EVENTS_STREAM,
            self._config(list(wanted)),
            decode_event,
            self._handle,
            batch=FETCH_BATCH,
            create=True,
        )
        reading = asyncio.create_task(self._consumer.run(stop))
        try:
            await _first(quit, self._changed, task=reading)
        finally:
            stop.set()
            await reading  # the batch in hand is acked first

    async def _provision(self, wanted: tuple[str, ...]) -> None:
        """Create, re-filter or delete the durable consumer to fit `wanted`."""
        if not wanted:
            with contextlib.suppress(NotFoundError):
                await self._js.delete_consumer(subjects.EVENTS_STREAM, self._durable)
        else:
            try:
                await self._js.add_consumer(subjects.EVENTS_STREAM, self._config(list(wanted)))
            except BadRequestError:  # overlapping patterns the server refuses: read them all
                await self._js.add_consumer(
                    subjects.EVENTS_STREAM, self._config([subjects.EVENTS_ALL])
                )
        log.info(
            "%s: reading events on %s",
            self._durable,
            ", ".join(wanted) or "nothing (no event rules)",
        )

    def _config(self, filters: list[str]) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=self._durable,
            filter_subjects=[subjects.stored_filter(f) for f in filters],
            ack_policy=AckPolicy.ALL,
            deliver_policy=DeliverPolicy.NEW,  # an updated consumer keeps its position
            ack_wait=30.0,
            max_ack_pending=1000,
        )


async def _first(*events: asyncio.Event, task: asyncio.Task[None] | None = None) -> None:
    """Wait until one of `events` is set or `task` ends (its failure is raised)."""
    waits: set[asyncio.Task[object]] = {asyncio.create_task(e.wait()) for e in events}
    if task is not None:
        waits.add(task)
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            if w is not task:
                w.cancel()
    if task is not None and task in done:
        task.result()
