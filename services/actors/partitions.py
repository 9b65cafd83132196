"""Which partitions of the device events this actors process works: a fair share, by leases.

The EVENTS stream stores each event with its partition (`events.~.<p>.<device>.<type>`, or
`events.<device>.<type>.<p>` on installs from before stop 21: `libs.subjects`; the stream's
subject transform hashing the device id), and each partition has its own durable consumer
(`actors-<p>`). Every actors process takes a fair share of the partitions' leases
(`libs.partitions.Share`, in a bucket of their own whose short ttl lets a dead process's
partitions be taken within 5 s) and works each partition it holds with its own consumer,
state memory and fence:

    lease taken → fence claimed (own transaction) → consumer bound → state read as needed
    → each commit checks the fence → lease lost, handed over or fenced → consumer stopped

The partitions' commits go through one `Committer`: those ready at the same time share a
transaction (and its fence statement).

Each partition held has its own presence tracker (`services.actors.presence`), fed by its
store: the process's presence scan judges the devices of the partitions it holds, and only
those, from memory; a partition taken over is read once by its new holder.

Before any partition is worked, the consumer of every event from before partitions (the
legacy `actors`, narrowed by the gateway to the events stored unpartitioned) is drained and
deleted, by one process holding its old lease (which also keeps out an old version still
running): a partitioned event applied before an older legacy event of the same device
would have that one dropped as a replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import bus, subjects
from libs import messages as m
from libs.cache import StateCache
from libs.consumer import ACK_PENDING, PENDING
from libs.lease import ACTOR_BUCKET, ACTOR_TTL_S, Lease
from libs.partitions import Share
from services.actors.cache_writer import CacheWriter
from services.actors.committer import Committer
from services.actors.fence import Fence
from services.actors.presence import PresenceTracker
from services.actors.store import StateStore
from services.actors.worker import PartitionWorker

log = logging.getLogger(__name__)

RETRY_S = 0.5  # how often a process without its share looks for a free partition
WATCH_S = 0.25  # how often a partition's worker looks for a lost lease or a hand-over
DRAIN_CHECK_S = 0.5


def partition_of(device_id: str, count: int) -> int:
    """The partition NATS's `partition(count, 1)` puts a device's events in: FNV-1a (32 bit)
    of the device id token, modulo the count. Routes a deleted device's drop to the one worker
    whose writes it must follow (a test checks it against the server's)."""
    h = 0x811C9DC5
    for byte in device_id.encode():
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h % count


def forget_lag(durable: str) -> None:
    """A partition let go is no longer this process's to report: its last pending count
    would otherwise stay in /metrics beside its new holder's (a sum of them counts twice)."""
    for gauge in (PENDING, ACK_PENDING):
        with contextlib.suppress(KeyError):
            gauge.remove(subjects.EVENTS_STREAM, durable)


class ActorPartitions:
    def __init__(
        self,
        nc: NATS,
        sessions: async_sessionmaker[AsyncSession],
        cache: StateCache,
        count: int,
        heartbeat_timeout_s: float | None = None,
    ) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._sessions = sessions
        self._cache = CacheWriter(cache)  # every partition's cache writes, grouped
        self.count = count
        self._timeout_s = heartbeat_timeout_s  # None: presence is not judged here
        self.committer = Committer(sessions)  # every partition's writes, grouped
        leases = [
            Lease(self._js, bus.actors_durable(i), ACTOR_TTL_S, ACTOR_BUCKET) for i in range(count)
        ]
        self.share = Share(
            self._js,
            "actors",
            leases,
            ttl=ACTOR_TTL_S,
            bucket_name=ACTOR_BUCKET,
            retry_s=RETRY_S,
        )
        self.workers: dict[int, PartitionWorker] = {}  # the partitions worked now
        self.draining: PartitionWorker | None = None
        # Readiness: set while the consumer of every partition held is bound (standing by
        # with none held counts: ready to take one), or the legacy one being drained is.
        self.bound = asyncio.Event()

    def partition(self, device_id: str) -> int:
        return partition_of(device_id, self.count)

    async def run(self, stop: asyncio.Event) -> None:
        registry = await self._nc.subscribe(subjects.DEVICE_REGISTRY_ALL, cb=self._on_registry)
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._track_bound(stop))
                if await self._drain_legacy(stop):
                    tasks.create_task(self.share.run(stop, self._serve))
        finally:
            self.bound.clear()
            with contextlib.suppress(Exception):
                await registry.unsubscribe()
            await self.committer.close()  # every partition stopped: nothing left to ack

    # --- a partition held -------------------------------------------------------------------

    async def _serve(self, index: int, stop: asyncio.Event, hand_over: Callable[[], bool]) -> None:
        """Work partition `index` (its lease just taken) until stop, a lost lease, a
        hand-over or a refused write; then let it go."""
        lease = self.share.leases[index]
        quit = asyncio.Event()
        store: StateStore | None = None
        try:
            fence = Fence(self._sessions, index, lease)
            if not await fence.claim():
                log.info("partition %d: the lease was lost before it was claimed", index)
                return
            store = StateStore(
                self._sessions, self._cache, self.committer, fence, self._presence(index)
            )
            # The stream's layout (an install's own, fixed): the consumer's filter as the
            # gateway made it, or the runtime would re-filter it at bind.
            config = bus.actors_consumer(index, await bus.partition_first(self._js))
            worker = PartitionWorker(self._nc, store, config, fence)
            self.workers[index] = worker
            log.info("working partition %d", index)

            async def watch() -> None:
                while not quit.is_set():
                    if stop.is_set() or not lease.held.is_set() or hand_over():
                        quit.set()
                    elif worker.fenced.is_set():
                        lease.held.clear()  # not ours: release() must not delete it
                        quit.set()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(quit.wait(), WATCH_S)

            async def consume() -> None:
                try:
                    await worker.run(quit)
                finally:
                    quit.set()

            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(lease.keep(quit))
                tasks.create_task(watch())
                tasks.create_task(consume())
        finally:
            quit.set()
            self.workers.pop(index, None)
            if store is not None:
                store.let_go()
            await lease.release()
            forget_lag(bus.actors_durable(index))
            log.info("let partition %d go", index)

    def _presence(self, index: int) -> PresenceTracker | None:
        if self._timeout_s is None:
            return None
        count = self.count
        return PresenceTracker(self._timeout_s, lambda d: partition_of(d, count) == index)

    async def _track_bound(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if self.draining is not None:
                bound = self.draining.consumer.bound.is_set()
            else:
                held = [self.workers.get(i) for i in self.share.held]
                bound = all(w is not None and w.consumer.bound.is_set() for w in held)
            if bound:
                self.bound.set()
            else:
                self.bound.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), WATCH_S)

    # --- registry changes -------------------------------------------------------------------

    async def _on_registry(self, msg: Msg) -> None:
        """What a registry fact says, to each partition's memory; a deleted device's state
        is dropped by the worker of its partition, after the batch it is writing (a drop by
        any other worker would not be ordered with that partition's writes: a device deleted
        and registered again at once could lose its new state)."""
        try:
            fact = m.registry_fact_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        workers = list(self.workers.values())
        if self.draining is not None:
            workers.append(self.draining)
        for worker in workers:
            worker.learn(fact)
        if fact.change == m.RegistryChange.DELETED:
            owner = self.draining or self.workers.get(partition_of(fact.device_id, self.count))
            if owner is not None:
                await owner.drop(fact.device_id)

    # --- the legacy consumer ----------------------------------------------------------------

    async def _drain_legacy(self, stop: asyncio.Event) -> bool:
        """Drain and delete the consumer from before partitions, if it is there (by whichever
        process holds its old lease); True once it is gone, False if stopped first."""
        lease = Lease(self._js, bus.LEGACY_ACTORS_DURABLE)
        told = False
        while not stop.is_set():
            try:
                await self._js.consumer_info(subjects.EVENTS_STREAM, bus.LEGACY_ACTORS_DURABLE)
            except NotFoundError:
                return True
            except Exception as exc:  # the bus is away: look again
                log.debug("legacy consumer: %r", exc)
            else:
                if await _try(lease):
                    try:
                        await self._drain(lease, stop)
                    finally:
                        await lease.release()
                    continue
                if not told:
                    log.info("the legacy actors consumer is drained by another process")
                    told = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), DRAIN_CHECK_S)
        return False

    async def _drain(self, lease: Lease, stop: asyncio.Event) -> None:
        log.info("draining the legacy actors consumer before working partitions")
        store = StateStore(self._sessions, self._cache, self.committer)
        worker = PartitionWorker(self._nc, store, bus.legacy_actors_consumer())
        self.draining = worker
        done = asyncio.Event()
        drained = False

        async def until_drained() -> None:
            nonlocal drained
            while not done.is_set():
                if stop.is_set() or not lease.held.is_set():
                    done.set()
                    return
                with contextlib.suppress(Exception):  # the bus is away: look again
                    info = await self._js.consumer_info(
                        subjects.EVENTS_STREAM, bus.LEGACY_ACTORS_DURABLE
                    )
                    if info.num_pending == 0 and info.num_ack_pending == 0:
                        drained = True
                        done.set()
                        return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), DRAIN_CHECK_S)

        async def consume() -> None:
            try:
                await worker.run(done)
            finally:
                done.set()

        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(lease.keep(done))
                tasks.create_task(until_drained())
                tasks.create_task(consume())
        finally:
            self.draining = None
        if drained:  # its reader stopped first: deleting under a pull would fail it
            await self._js.delete_consumer(subjects.EVENTS_STREAM, bus.LEGACY_ACTORS_DURABLE)
            log.info("drained and deleted the legacy actors consumer")


async def _try(lease: Lease) -> bool:
    try:
        return await lease.try_acquire()
    except Exception as exc:  # the bus is away: try again later
        log.debug("lease: %r", exc)
        return False
