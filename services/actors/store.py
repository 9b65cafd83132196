"""Where device state lives: in the actors' memory while they own it, in the database (the
truth), and in the cache for the gateway.

The virtual-actor model: a device's state is read from the database when the worker first
needs it after its partition is taken (a store per lease), and kept in memory for as long as
the lease is held. A batch's state is kept in memory when it is handed to the process's
`Committer` (the next batch is decided on it while it commits): the committer commits every
write handed to it, in order, or fails it with those behind it, and then the worker stops and
this memory goes with it.

Each partition's store also tells its presence tracker (`services.actors.presence`) of every
committed state and registry change, and keeps what the tracker judges by: each device's
report intervals, read with its standing.

The cache is never read here: a cache restored from an old snapshot, flushed, or written by
another process can change nothing the actors decide. It is written after each commit, newer
states only, by the process's `CacheWriter`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import capabilities
from libs import messages as m
from libs.actor_batch import Standing, standing
from libs.db.models import Device, DeviceState
from libs.device_state import presence
from libs.messages import DeviceSnapshot
from services.actors.cache_writer import CacheWriter
from services.actors.committer import Committer
from services.actors.fence import Fence

if TYPE_CHECKING:
    from services.actors.presence import PresenceTracker

# What presence needs of a registry entry: id, lifecycle, enabled, kind, report intervals.
_Entry = tuple[str, str, bool, str, dict[str, float | None]]

# A standing in memory comes from the registry facts, a moment after each change is
# committed: an event sent right after an approval (or a reconnect, a registration) could be
# refused on the old one. So a device whose remembered standing refuses its events is read
# again before they are, at most this often (one that sends fast while pending costs no read a
# message).
RECHECK_S = 1.0

# Devices whose state is kept in memory; past it, those least recently written are read
# again from the database when next needed.
MAX_ACTIVE = 100_000


class StateStore:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        cache: CacheWriter,
        committer: Committer,
        fence: Fence | None = None,
        presence: PresenceTracker | None = None,
    ) -> None:
        self._sessions = sessions
        self._cache = cache
        self._committer = committer
        self._fence = fence
        self.presence = presence  # None: no presence judged here (the legacy drain)
        self._standing: dict[str, Standing | None] = {}  # None: known not to be registered
        self._rechecked: dict[str, float] = {}  # refused standings: when last read (monotonic)
        self._learned = 0  # registry facts taken: a read older than one does not overrule it
        # Each device's report intervals (`capabilities.report_intervals`), read with its
        # standing; a registry fact drops them (the fact does not carry them).
        self._intervals: dict[str, Mapping[str, float]] = {}
        self._shared: dict[object, Mapping[str, float]] = {}  # one mapping per distinct value
        # Each device's latest state under this lease: committed, or handed to the
        # committer (which commits it, or fails it and the worker stops).
        self._active: dict[str, DeviceSnapshot] = {}

    async def load(self, device_ids: list[str]) -> dict[str, DeviceSnapshot]:
        """Snapshots for these devices, as last committed; a device never seen starts empty.
        What is read is kept."""
        missing = [d for d in device_ids if d not in self._active]
        found = await self.peek(device_ids)
        for d in missing:
            found[d] = found.get(d) or DeviceSnapshot(device_id=d)
            self._keep(found[d])
        return {d: found[d] for d in device_ids}

    def _keep(self, snapshot: DeviceSnapshot) -> None:
        self._active.pop(snapshot.device_id, None)  # to the end: the most recently used
        self._active[snapshot.device_id] = snapshot
        if len(self._active) > MAX_ACTIVE:
            oldest = next(iter(self._active))
            del self._active[oldest]

    async def registry(self, device_ids: list[str]) -> dict[str, Standing]:
        """The standing of each registered device (absent: not registered, or decommissioned).

        Known devices are answered from memory, kept up to date by the registry facts
        (`learn`); those whose standing refuses their events are read again first (at most
        every `RECHECK_S`). Unknown ones are asked for every time (they may register any
        moment).
        """
        now = time.monotonic()
        doubted = [d for d in device_ids if self._refused_before(d, now)]
        missing = [d for d in device_ids if d not in self._standing]
        if missing or doubted:
            learned = self._learned
            for d, life, on, kind, overrides in await self._entries(missing + doubted):
                if d in self._rechecked and learned == self._learned:  # no fact meanwhile
                    self._standing[d] = standing(life, on)
                self.remember(d, standing(life, on), kind, overrides)
        return {d: s for d in device_ids if (s := self._standing.get(d)) is not None}

    def _refused_before(self, device_id: str, now: float) -> bool:
        """Whether the device is known and its standing refuses events, not read again for
        `RECHECK_S` (then it is marked read now)."""
        if device_id not in self._standing or self._standing[device_id] == Standing.ACTIVE:
            self._rechecked.pop(device_id, None)
            return False
        if now - self._rechecked.get(device_id, -RECHECK_S) < RECHECK_S:
            return False
        self._rechecked[device_id] = now
        return True

    async def profiles(
        self, device_ids: list[str]
    ) -> dict[str, tuple[Standing | None, Mapping[str, float] | None]]:
        """What presence judges these devices by: standing and report intervals (None: not
        registered), from memory, else read (one statement for those missing)."""
        missing = [d for d in device_ids if d not in self._standing or d not in self._intervals]
        if missing:
            for d, life, on, kind, overrides in await self._entries(missing):
                self.remember(d, standing(life, on), kind, overrides)
        return {d: (self._standing.get(d), self._intervals.get(d)) for d in device_ids}

    def remember(
        self,
        device_id: str,
        read: Standing | None,
        kind: str,
        overrides: Mapping[str, float | None] | None,
    ) -> tuple[Standing | None, Mapping[str, float]]:
        """A registry entry read for presence: its intervals; its standing unless a registry
        fact told one already (the fact is the newer word)."""
        held = self._standing.setdefault(device_id, read)
        intervals = self._intervals[device_id] = self._merged(kind, overrides)
        return held, intervals

    async def _entries(self, device_ids: list[str]) -> list[_Entry]:
        """The registry entries of these devices: standing and intervals, one statement."""
        async with self._sessions() as session:
            rows = await session.execute(
                select(
                    Device.id,
                    Device.lifecycle,
                    Device.enabled,
                    Device.kind,
                    Device.report_intervals,
                ).where(Device.id.in_(device_ids))
            )
            return [(d, life, on, kind, intervals) for d, life, on, kind, intervals in rows]

    def _merged(
        self, kind: str, overrides: Mapping[str, float | None] | None
    ) -> Mapping[str, float]:
        """The intervals of this kind and overrides, shared by every device that has them
        (a fleet has few distinct ones)."""
        key = (kind, tuple(sorted((overrides or {}).items())))
        found = self._shared.get(key)
        if found is None:
            found = self._shared[key] = capabilities.report_intervals(kind, overrides)
        return found

    def learn(self, device_id: str, standing: Standing | None) -> None:
        """What a registry fact says (None: deleted), taken from the fact: no database read
        per registry change (the fact comes from the gateway's outbox once its change is
        committed). Its report intervals (the fact does not carry them) are read again when
        presence next judges the device: at once, if it is of this partition."""
        self._standing[device_id] = standing
        self._learned += 1
        self._changed(device_id)

    def forget(self, device_id: str) -> None:
        self._standing.pop(device_id, None)
        self._learned += 1
        self._changed(device_id)

    def _changed(self, device_id: str) -> None:
        self._intervals.pop(device_id, None)
        if self.presence is not None:
            self.presence.counts_moved = True  # its lifecycle may be counted elsewhere now
            if self.presence.owns(device_id):
                self.presence.wake(device_id)

    async def peek(self, device_ids: list[str]) -> dict[str, DeviceSnapshot]:
        """The latest state of these devices (absent: none), from memory, else read (one
        statement for those missing). Not kept: a read here racing a batch's read and
        hand-over could keep an older state over the batch's."""
        found = {d: self._active[d] for d in device_ids if d in self._active}
        missing = [d for d in device_ids if d not in found]
        if missing:
            async with self._sessions() as session:
                rows = await session.scalars(
                    select(DeviceState).where(DeviceState.device_id.in_(missing))
                )
                found.update({r.device_id: r.snapshot() for r in rows})
        return found

    def drop(self, device_id: str) -> asyncio.Future[None]:
        """A deleted device leaves no state behind for a later device of the same id: from
        now on it has none (the next batch decides on none), and its row is deleted after
        the writes handed over before; the future ends with that (`Fenced`: refused)."""
        self._keep(DeviceSnapshot(device_id=device_id))
        self._cache.discard(device_id)
        return self._committer.submit(self, self._fence, [], [], drops=[device_id])

    async def uncache(self, device_id: str) -> None:
        await self._cache.delete(device_id)

    def hand(
        self,
        snapshots: list[DeviceSnapshot],
        statuses: list[tuple[str, m.CommandStatusData]],
    ) -> asyncio.Future[None] | None:
        """Hand snapshots and command statuses to the committer and keep the snapshots in
        memory now; the future ends once they are committed (`Fenced`: refused). With a
        fence the commit checks it even with nothing to write: a batch is acked only while
        its partition is still this worker's. None: nothing to commit."""
        if not snapshots and not statuses and self._fence is None:
            return None
        moved = self.presence is not None and any(self._moves(s) for s in snapshots)
        for snapshot in snapshots:
            self._keep(snapshot)
        handed = self._committer.submit(self, self._fence, snapshots, statuses)
        if moved:  # counted again once committed (the count reads the database)
            handed.add_done_callback(self._counts_moved)
        return handed

    def _moves(self, snapshot: DeviceSnapshot) -> bool:
        """Whether the device's presence (online, offline, stale) changes with this state."""
        old = self._active.get(snapshot.device_id)
        if old is None:
            return True
        before = presence(old.connection, old.stale)
        return before != presence(snapshot.connection, snapshot.stale)

    def _counts_moved(self, _: asyncio.Future[None]) -> None:
        if self.presence is not None:
            self.presence.counts_moved = True

    async def committed(self, snapshots: list[DeviceSnapshot]) -> None:
        """Tell presence and the cache of these committed states."""
        if self.presence is not None:
            for snapshot in snapshots:
                d = snapshot.device_id
                self.presence.update(snapshot, self._standing.get(d), self._intervals.get(d))
        await self._cache.write(self, snapshots)

    def let_go(self) -> None:
        """The partition is no longer this process's: what the cache missed of it is its
        next holder's to write."""
        self._cache.abandon(self)
