"""The actors' cache writes: every partition's committed states, one call at a time.

The cache (`libs.cache`) is never read by the actors; it is written after each commit for
the gateway, newer states only (`StateCache.put_newer`). The states committed while a call
is under way go together in the next one: with 16 partitions and a few events a batch, a
call per batch was most of what the cache cost the actors.

While the cache cannot be written (Redis down), the actors go on: what it missed is kept
and written a little at a time with the calls that follow once it answers again.
"""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import Counter

from libs.cache import StateCache
from libs.loops import OnOneLoop
from libs.messages import DeviceSnapshot

log = logging.getLogger(__name__)

# A cache that does not answer is not asked again for this long: its outage costs the
# actors nothing but a late cache.
CACHE_TIMEOUT_S = 1.0
CACHE_RETRY_S = 5.0
# What the cache missed is written this many at a time, with the calls that follow: a long
# outage's backlog does not hold up one call (and the acks behind it) for long.
CACHE_REFILL = 1000

CACHE_WRITES = Counter(
    "smarthome_actor_cache_writes_total",
    "Cache writes after a commit: stored, skipped (the cache holds a newer or equal state), "
    "failed (the cache is down: written once it answers again)",
    ["outcome"],
)

# A committed state, and the partition's store that committed it.
_Entry = tuple[object, DeviceSnapshot]


class CacheWriter(OnOneLoop):
    """One actors process's cache writes (see the module)."""

    def __init__(self, cache: StateCache) -> None:
        self._cache = cache
        self._pending: dict[str, _Entry] = {}  # for the next call, the newest of each device
        self._call: asyncio.Future[None] | None = None  # ends when the next call has
        self._task: asyncio.Task[None] | None = None
        self._behind: dict[str, _Entry] = {}  # what the cache missed while down
        self._retry_at = 0.0

    async def write(self, owner: object, snapshots: list[DeviceSnapshot]) -> None:
        """Write these committed states (`owner`: the store that committed them) with the
        others waiting; returns once written, or noted as missed if the cache is down."""
        if not snapshots:  # (a batch that changed no state): no call would end its wait
            return
        loop = self._loop
        for snapshot in snapshots:
            self._pending[snapshot.device_id] = (owner, snapshot)
        if self._call is None:
            self._call = loop.create_future()
        call = self._call
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())
        await asyncio.shield(call)  # shared: a cancelled writer must not cancel it

    def discard(self, device_id: str) -> None:
        """A deleted device: what the cache missed of it must not come back."""
        self._behind.pop(device_id, None)

    def abandon(self, owner: object) -> None:
        """A partition let go: its next holder writes its devices' states from now on."""
        self._behind = {d: e for d, e in self._behind.items() if e[0] is not owner}

    async def delete(self, device_id: str) -> None:
        await self._cache.delete(device_id)

    async def _run(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, {}
            call, self._call = self._call, None
            try:
                await self._put(batch)
            finally:
                if call is not None:  # (set here only)
                    call.set_result(None)

    async def _put(self, batch: dict[str, _Entry]) -> None:
        """Write `batch` and some of what the cache missed before; while the cache fails,
        only note what it misses."""
        if time.monotonic() < self._retry_at:
            self._behind.update(batch)
            return
        backlog = [e for d, e in self._behind.items() if d not in batch][:CACHE_REFILL]
        entries = [*batch.values(), *backlog]
        try:
            async with asyncio.timeout(CACHE_TIMEOUT_S):
                stored = await self._cache.put_newer([snapshot for _, snapshot in entries])
        except Exception as exc:  # an accelerator: its outage must not stop the actors
            if not self._retry_at:
                log.warning("state cache unavailable, going on without it: %r", exc)
            self._retry_at = time.monotonic() + CACHE_RETRY_S
            self._behind.update(batch)
            CACHE_WRITES.labels("failed").inc(len(batch))
            return
        if self._retry_at:
            log.info("state cache answers again; writing the %d states it missed", len(backlog))
            self._retry_at = 0.0
        for device_id in batch:
            self._behind.pop(device_id, None)
        for entry in backlog:
            if self._behind.get(entry[1].device_id) is entry:
                del self._behind[entry[1].device_id]
        CACHE_WRITES.labels("stored").inc(stored)
        CACHE_WRITES.labels("skipped").inc(len(entries) - stored)
