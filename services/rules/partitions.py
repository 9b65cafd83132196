"""Which partitions of the rules this process evaluates: a fair share of them, by leases.

Every rules process runs one task per partition. A task takes its partition's lease when
the lease is free and the process holds fewer than its fair share (partitions / live rules
processes, rounded up); a process holding more than its share (another one joined) hands
its highest partition over, after acking the batch in hand. A process that dies stops
renewing its leases: the others take its partitions within the lease's ttl, resume the
episodes from KV and the un-acked facts from the partition's durable consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import zlib
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import bus, subjects
from libs.lease import Members
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
        self._members = Members(js, "rules", self.engines[0].lease.owner)
        self._share = count  # until the members are counted
        self.held: set[int] = set()
        # Set while the consumers of every partition held are bound (standing by with none
        # held, once provisioned, counts: the process is ready to take one).
        self.bound = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        await provision(self._js, len(self.engines))
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._members.beat(stop))
                tasks.create_task(self._count_members(stop))
                tasks.create_task(self._track_bound(stop))
                for engine in self.engines:
                    tasks.create_task(self._own(engine, stop))
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

    async def _count_members(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):
                self._share = math.ceil(len(self.engines) / await self._members.count())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RETRY_S)

    def _too_many(self, index: int) -> bool:
        """Hand over this partition: the process holds more than its share, and it is the
        highest one held (one at a time, so the share is never undershot)."""
        return len(self.held) > self._share and index == max(self.held)

    async def _own(self, engine: RulesEngine, stop: asyncio.Event) -> None:
        index = engine.partition.index
        standing_by = False
        while not stop.is_set():
            if len(self.held) < self._share:  # else: leave the partition to another process
                if await _try(engine):
                    await self._serve(engine, stop)
                    standing_by = False
                elif not standing_by:
                    log.info("partition %d is evaluated by another process; standing by", index)
                    standing_by = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RETRY_S)

    async def _serve(self, engine: RulesEngine, stop: asyncio.Event) -> None:
        index = engine.partition.index
        self.held.add(index)
        try:
            await engine.serve(stop, lambda: self._too_many(index))
        except Exception as exc:  # the bus or the database went away: let another try
            log.warning("partition %d stopped: %r", index, exc, exc_info=True)
        finally:
            self.held.discard(index)


async def _try(engine: RulesEngine) -> bool:
    try:
        return await engine.lease.try_acquire()
    except Exception as exc:  # the bus is away: try again later
        log.debug("lease %s: %r", engine.partition.lease, exc)
        return False


async def provision(js: JetStreamContext, count: int) -> None:
    """Create the partitions' fact consumers; delete those of partitions that no longer
    exist (the setting went down), so that the bus does not keep facts for nobody."""
    for index in range(count):
        await js.add_consumer(subjects.SYSTEM_STREAM, bus.rules_facts_consumer(index))
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
