"""A partition's consumers of device events and of state facts: each read only while a rule
of the partition needs it, on the subjects its rules need, through the consumer runtime
(`libs.consumer`). A fleet's facts that no rule reads are not delivered to the rules at all.

When what the rules need changes, the running consumer stops between batches (its last
batch acked), the durable consumer is re-filtered (it keeps its position) or deleted, and a
new runtime binds it; what the last reader left un-acked is recovered at bind. A consumer
made anew delivers what is published from then on (a rule is not told of the past).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import BadRequestError, NotFoundError

from libs import subjects
from libs.consumer import Consumer, Decoder, Handler

log = logging.getLogger(__name__)

FETCH_BATCH = 256

T = TypeVar("T")


def disjoint(patterns: Iterable[str]) -> tuple[str, ...]:
    """Drop patterns another one already covers (the server refuses overlapping filters)."""
    found = sorted(set(patterns))
    return tuple(p for p in found if not any(o != p and subjects.matches(o, p) for o in found))


class Reader(Generic[T]):
    """The durable consumer `durable` of `stream` (`what` it reads, for the log), filtered
    to what `want` was last told.

    `stored` maps a wanted subject to the stream's stored subject (events carry a partition
    token); `everything` is read instead when the server refuses the filters."""

    def __init__(
        self,
        nc: NATS,
        stream: str,
        durable: str,
        what: str,
        decode: Decoder[T],
        handle: Handler[T],
        everything: str,
        stored: Callable[[str], str] = lambda s: s,
    ) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._stream = stream
        self._durable = durable
        self._what = what
        self._decode = decode
        self._handle = handle
        self._everything = everything
        self._stored = stored
        self._wanted: tuple[str, ...] | None = None  # None: not told yet, touch nothing
        self._changed = asyncio.Event()
        self._applied: tuple[str, ...] | None = None  # what the consumer fits
        self._moved = asyncio.Event()  # set when `_applied` changes
        self._consumer: Consumer[T] | None = None

    async def want(self, patterns: Iterable[str], quit: asyncio.Event) -> None:
        """Read these subjects from now on (none: no consumer at all). Returns once the
        consumer fits what was last wanted, or `quit` is set."""
        wanted = disjoint(patterns)
        if wanted != self._wanted:
            self._wanted = wanted
            self._changed.set()
        while self._applied != self._wanted and not quit.is_set():
            await _first(quit, self._moved)

    @property
    def bound(self) -> bool:
        """Bound, or nothing to read."""
        return self._wanted == () or (self._consumer is not None and self._consumer.bound.is_set())

    async def run(self, quit: asyncio.Event) -> None:
        config: ConsumerConfig | None = None  # the consumer as provisioned; None: none
        try:
            while not quit.is_set():
                self._changed.clear()
                wanted = self._wanted
                if wanted is not None and wanted != self._applied:
                    config = await self._provision(wanted)
                    self._settle(wanted)
                if config is not None:
                    await self._read(config, quit)
                else:
                    await _first(quit, self._changed)
        finally:  # the next run waits to be told, and provisions anew what it finds
            self._wanted = None
            self._settle(None)

    def _settle(self, applied: tuple[str, ...] | None) -> None:
        self._applied = applied
        self._moved.set()  # wakes who waits now; who waits next waits for the next
        self._moved = asyncio.Event()

    async def _read(self, config: ConsumerConfig, quit: asyncio.Event) -> None:
        stop = asyncio.Event()
        self._consumer = Consumer(
            self._nc,
            self._stream,
            config,
            self._decode,
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

    async def _provision(self, wanted: tuple[str, ...]) -> ConsumerConfig | None:
        """Create, re-filter or delete the durable consumer to fit `wanted`; its config
        (what the runtime binds with: the one the server took), None when deleted."""
        log.info("%s: reading %s on %s", self._durable, self._what, _listed(wanted))
        if not wanted:
            with contextlib.suppress(NotFoundError):
                await self._js.delete_consumer(self._stream, self._durable)
            return None
        config = self._config(list(wanted))
        try:
            await self._js.add_consumer(self._stream, config)
        except BadRequestError:  # overlapping patterns the server refuses: read them all
            config = self._config([self._everything])
            await self._js.add_consumer(self._stream, config)
        return config

    def _config(self, filters: list[str]) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=self._durable,
            filter_subjects=[self._stored(f) for f in filters],
            ack_policy=AckPolicy.ALL,
            deliver_policy=DeliverPolicy.NEW,  # an updated consumer keeps its position
            ack_wait=30.0,
            max_ack_pending=1000,
        )


def _listed(wanted: tuple[str, ...], most: int = 10) -> str:
    """The subjects for the log: a few, and how many in all (a rule may name hundreds)."""
    if not wanted:
        return "nothing (no rule needs them)"
    shown = ", ".join(wanted[:most])
    return shown if len(wanted) <= most else f"{shown}, … ({len(wanted)} in all)"


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
