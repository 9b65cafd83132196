"""Which partitions of the rules this process evaluates: a fair share of them, by leases.

The sharing is `libs.partitions.Share`'s: each rules process takes a fair share of the
partitions' leases; one holding more than its share (another one joined) hands its highest
partition over, after acking the batch in hand. A process that dies stops renewing its
leases: the others take its partitions within the lease's ttl, resume the episodes from KV
and the un-acked facts from the partition's durable consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import bus, subjects
from libs.partitions import Share
from services.rules.engine import RulesEngine
from services.rules.timers import TICK_S

log = logging.getLogger(__name__)

RETRY_S = 2.0  # how often a process without its share looks for a free partition


@dataclass(frozen=True, slots=True)
class Partition:
    """Partition `index` of `count`: the rules whose id hashes to it, and its bus names."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, rule_id: str) -> bool:
        return zlib.crc32(rule_id.encode()) % self.count == self.index

    @property
    def lease(self) -> str:
        return f"rules-{self.index}"

    @property
    def facts_durable(self) -> str:
        return bus.rules_facts_durable(self.index)

    @property
    def events_durable(self) -> str:
        return bus.rules_events_durable(self.index)


class Partitions:
    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        sessions: async_sessionmaker[AsyncSession],
        count: int,
    ) -> None:
        self._js = js
        self.engines = [RulesEngine(nc, js, sessions, Partition(i, count)) for i in range(count)]
        self._share = Share(js, "rules", [e.lease for e in self.engines], retry_s=RETRY_S)
        # Set while the consumers of every partition held are bound (standing by with none
        # held, once provisioned, counts: the process is ready to take one).
        self.bound = asyncio.Event()

    @property
    def held(self) -> set[int]:
        return self._share.held

    async def run(self, stop: asyncio.Event) -> None:
        await provision(self._js, len(self.engines))
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._share.run(stop, self._serve))
                tasks.create_task(self._track_bound(stop))
        finally:
            self.bound.clear()

    async def _track_bound(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            held = [e for e in self.engines if e.partition.index in self.held]
            if all(e.bound.is_set() for e in held):
                self.bound.set()
            else:
                self.bound.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TICK_S)

    async def reload_rules(self) -> None:
        for engine in self.engines:
            if engine.partition.index in self.held:
                await engine.reload_rules()

    async def _serve(self, index: int, stop: asyncio.Event, hand_over: Callable[[], bool]) -> None:
        await self.engines[index].serve(stop, hand_over)


async def provision(js: JetStreamContext, count: int) -> None:
    """Delete the consumers of partitions that no longer exist (the setting went down), so
    that the bus does not keep facts for nobody. A partition's own consumers are made by
    its engine, filtered to what its rules read (`services.rules.readers`)."""
    # (Before partitions, the one set of consumers was named `rules` and `rules-events`.)
    stale = {
        subjects.SYSTEM_STREAM: re.compile(r"rules(?:-(\d+))?$"),
        subjects.EVENTS_STREAM: re.compile(r"rules-events(?:-(\d+))?$"),
    }
    for stream, pattern in stale.items():
        for info in await js.consumers_info(stream):
            found = pattern.match(info.name)
            if found and (found.group(1) is None or int(found.group(1)) >= count):
                with contextlib.suppress(NotFoundError):
                    await js.delete_consumer(stream, info.name)
                log.info("deleted consumer %s of a partition that no longer exists", info.name)
