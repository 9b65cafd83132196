"""A fair share of P partitions for each live process of a kind, by leases in JetStream KV.

Each partition has a lease (`libs.lease.Lease`). Every process runs one task per partition:
it takes the partition's lease when the lease is free and the process holds fewer than its
fair share (partitions / live processes of the kind, rounded up), and then serves it until
the work ends (stop, a lost lease, or a hand-over). A process holding more than its share
(another one joined) hands over its highest partition, one at a time, so that the share is
never undershot. A process that dies stops renewing its leases and its membership: both
expire with the bucket's ttl and the others take its partitions.

The live processes are counted by `Members` keys in the same bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Sequence

from nats.js import JetStreamContext

from libs.lease import BUCKET, Lease, Members

log = logging.getLogger(__name__)

RETRY_S = 2.0  # how often a process without its share looks for a free partition

# Serve partition `index` (its lease just taken) until `stop` is set, the lease is lost or
# `hand_over()` says to; renewing and releasing the lease is the server's part.
Serve = Callable[[int, asyncio.Event, Callable[[], bool]], Awaitable[None]]


class Share:
    """The partitions `leases` (one per partition, by index) this process holds."""

    def __init__(
        self,
        js: JetStreamContext,
        kind: str,
        leases: Sequence[Lease],
        *,
        ttl: float = 6.0,
        bucket_name: str = BUCKET,
        retry_s: float = RETRY_S,
    ) -> None:
        if not leases:
            raise ValueError("a share of no partitions")
        self.leases = list(leases)
        self._members = Members(js, kind, leases[0].owner, ttl, bucket_name)
        self._retry_s = retry_s
        self._share = len(leases)  # until the members are counted
        self.held: set[int] = set()
        self.changed = asyncio.Event()  # set on every partition taken or let go

    @property
    def share(self) -> int:
        return self._share

    async def run(self, stop: asyncio.Event, serve: Serve) -> None:
        """Take and serve a fair share until `stop` is set."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._members.beat(stop))
            tasks.create_task(self._count_members(stop))
            for index in range(len(self.leases)):
                tasks.create_task(self._own(index, stop, serve))

    async def _count_members(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):
                self._share = math.ceil(len(self.leases) / await self._members.count())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._retry_s)

    def too_many(self, index: int) -> bool:
        """Hand over this partition: the process holds more than its share, and it is the
        highest one held (one at a time, so the share is never undershot)."""
        return len(self.held) > self._share and index == max(self.held)

    async def _own(self, index: int, stop: asyncio.Event, serve: Serve) -> None:
        standing_by = False
        while not stop.is_set():
            if len(self.held) < self._share:  # else: leave the partition to another process
                if await _try(self.leases[index]):
                    await self._serve(index, stop, serve)
                    standing_by = False
                elif not standing_by:
                    log.info("partition %d is held by another process; standing by", index)
                    standing_by = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._retry_s)

    async def _serve(self, index: int, stop: asyncio.Event, serve: Serve) -> None:
        self.held.add(index)
        self.changed.set()
        try:
            await serve(index, stop, lambda: self.too_many(index))
        except Exception as exc:  # the bus or the database went away: let another try
            log.warning("partition %d stopped: %r", index, exc, exc_info=True)
        finally:
            self.held.discard(index)
            self.changed.set()


async def _try(lease: Lease) -> bool:
    try:
        return await lease.try_acquire()
    except Exception as exc:  # the bus is away: try again later
        log.debug("lease: %r", exc)
        return False
