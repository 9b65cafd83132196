"""Presence: a device silent for longer than the heartbeat timeout goes offline, and an
online device's attribute not reported for longer than expected is stale.

The judge does not write state itself: it publishes a `presence_timeout` event on the
device's own subject, so the change is applied in order with the device's other events (a
report that came after the finding wins) and announced by the actors' state fact, which the
rules read. An attribute turns fresh again when the device reports it: the actors see that
without a finding.

Each actors process judges only the devices of the partitions it holds, from what it keeps
in memory: each partition's `PresenceTracker` holds a heap of the next moment each online
device may change (goes offline, or an attribute goes stale). It is fed

- once when the partition is taken: one read of the online devices, filtered to the
  partitions taken since the last tick (a device that went silent before the take-over is
  found by its new holder);
- by every committed state (`StateStore.committed`), and by every registry fact of one of
  its devices (its intervals, lifecycle or enablement changed: judged again at once).

Every `timeout / 3` the scan (`scan_once`) pops what is due in each held partition and
judges it on its current state (memory, or the database for a device evicted from it): a
tick with nothing due reads nothing. Entries are deleted lazily: an entry is only a moment
to look again, so a deadline pushed back (the device spoke) costs no heap operation, and an
early entry is judged, found not due, and put back at the right moment.

Every `min(60 s, 6 ticks)` the scan also sets `smarthome_devices{connection, lifecycle}`
from the database (`libs.presence`), so every actors replica reports the same platform-wide
count (the alerts read it with `max`); every combination is set, zeros too, so a count that
drops to none reads 0 rather than vanishing. A change the process saw (a presence change
committed in a partition it holds, a registry fact) has it counted at the next tick, unless
counting costs too much for that (a count that took `t` waits `20 t`): a status page shows
a new device in the gauge at once, a fleet of millions is counted once a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import msgspec
from nats.js import JetStreamContext
from prometheus_client import Gauge
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import bus
from libs import messages as m
from libs.actor_batch import Standing, standing
from libs.db.models import Device, DeviceState
from libs.device_state import overdue
from libs.presence import device_counts

if TYPE_CHECKING:
    from services.actors.partitions import ActorPartitions
    from services.actors.store import StateStore

log = logging.getLogger(__name__)

# Due devices are judged this many at a time (their state and registry entries read in one
# statement each when not in memory): the event loop, which the partitions' batches share,
# is never held for all of them at once.
JUDGE_CHUNK = 200
# The take-over read goes through the online devices this many rows at a time.
SEED_CHUNK = 250
# The gauge is counted from the whole registry: once a minute, or every few ticks when the
# timeout is short (tests), not every tick; sooner after a change this process saw (a
# device's presence in a partition it holds, a registry entry), but a count that took `cost`
# no sooner than this many times that: counting takes at most a small share of the time.
COUNT_EVERY_S = 60.0
COUNT_EVERY_TICKS = 6
COUNT_COST_SHARE = 20

# What a take-over needs of each online device to know when to look at it next.
_ONLINE = (
    select(
        DeviceState.device_id,
        DeviceState.last_seen,
        DeviceState.reported,
        DeviceState.stale,
        Device.kind,
        Device.report_intervals,
        Device.lifecycle,
        Device.enabled,
    )
    .join(Device, Device.id == DeviceState.device_id)
    .where(DeviceState.connection == "online")
)

DEVICES = Gauge(
    "smarthome_devices",
    "Registered devices per connection (online, offline, or stale: online with an attribute "
    "not reported for longer than expected) and lifecycle; platform-wide, the same in every "
    "actors replica",
    ["connection", "lifecycle"],
)

Intervals = Mapping[str, float]


# --- the pure part: when to look, and what is found -------------------------------------------


def due_at(
    snapshot: m.DeviceSnapshot,
    standing: Standing | None,
    intervals: Intervals | None,
    timeout_s: float,
) -> float | None:
    """When this device may next change (epoch seconds): the earliest of its going offline
    and an attribute going stale; None when nothing can (offline, or not applied: a finding
    for a device not active would be refused). Unknown intervals: at once (they are read then)."""
    if snapshot.connection != "online" or snapshot.last_seen is None:
        return None
    if standing != Standing.ACTIVE:
        return None
    if intervals is None:
        return 0.0
    due = snapshot.last_seen.timestamp() + timeout_s
    for name, at in snapshot.reported.items():
        seconds = intervals.get(name)
        if seconds is not None and name not in snapshot.stale:
            due = min(due, at.timestamp() + seconds)
    return due


def judge(
    snapshot: m.DeviceSnapshot,
    standing: Standing | None,
    intervals: Intervals,
    timeout_s: float,
    now: datetime,
) -> tuple[m.CloudEvent | None, m.DeviceSnapshot]:
    """The finding on this device now, if any (timed out, which says more than staleness,
    or its overdue attributes changed), and the state to schedule it from once the finding
    is published: offline, or the found attributes stale (its state fact will say so; until
    then nothing new is looked for in them)."""
    if snapshot.connection != "online" or snapshot.last_seen is None:
        return None, snapshot
    if standing != Standing.ACTIVE:
        return None, snapshot
    if snapshot.last_seen < now - timedelta(seconds=timeout_s):
        offline = msgspec.structs.replace(snapshot, connection="offline")
        return _timeout(snapshot.device_id, snapshot.last_seen), offline
    if not intervals and not snapshot.stale:
        return None, snapshot
    found = overdue(intervals, snapshot.reported, now)
    if sorted(found) == sorted(snapshot.stale):
        return None, snapshot
    stale = msgspec.structs.replace(snapshot, stale=sorted(found))
    return _staleness(snapshot.device_id, snapshot.version, found), stale


class PresenceTracker:
    """The next moments to look at the online devices of one partition: a heap of (due,
    device), deleted lazily. `_due` holds each device's earliest live entry; an entry that
    is not it is skipped when popped."""

    def __init__(self, timeout_s: float, owns: Callable[[str], bool]) -> None:
        self.timeout_s = timeout_s
        self.owns = owns  # whether a device is of this partition
        self.seeded = False  # the take-over read is done
        # A device's presence or a registry entry changed: the gauge is counted again soon.
        self.counts_moved = False
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._due)

    def update(
        self, snapshot: m.DeviceSnapshot, standing: Standing | None, intervals: Intervals | None
    ) -> None:
        self.schedule(snapshot.device_id, due_at(snapshot, standing, intervals, self.timeout_s))

    def schedule(self, device_id: str, due: float | None) -> None:
        """Look at the device at `due` (None: not at all). A later moment than the one held
        moves nothing: the device is looked at then, and put back at the right one."""
        if due is None:
            self._due.pop(device_id, None)
            return
        held = self._due.get(device_id)
        if held is not None and held <= due:
            return
        self._due[device_id] = due
        heapq.heappush(self._heap, (due, device_id))
        if len(self._heap) > 2 * len(self._due) + 1024:
            self._compact()

    def wake(self, device_id: str) -> None:
        """Look at the device at the next tick (its registry entry changed)."""
        self.schedule(device_id, 0.0)

    def pop(self, now: float) -> list[str]:
        """The devices due at `now`, taken off the heap (each is scheduled again once judged)."""
        out = []
        while self._heap and self._heap[0][0] <= now:
            due, device_id = heapq.heappop(self._heap)
            if self._due.get(device_id) == due:
                del self._due[device_id]
                out.append(device_id)
        return out

    def _compact(self) -> None:
        self._heap = [(due, d) for d, due in self._due.items()]
        heapq.heapify(self._heap)


# --- the process's scan -----------------------------------------------------------------------


async def scan_forever(
    js: JetStreamContext,
    sessions: async_sessionmaker[AsyncSession],
    partitions: ActorPartitions,
    timeout_s: float,
    stop: asyncio.Event,
) -> None:
    interval = max(timeout_s / 3, 0.5)
    count_every = min(COUNT_EVERY_S, COUNT_EVERY_TICKS * interval)
    counted, cost = -math.inf, 0.0
    while not stop.is_set():
        try:
            await scan_once(js, sessions, partitions)
        except Exception as exc:  # the next scan tries again; presence is not worth a crash
            log.warning("presence scan failed: %s", exc)
        since = time.monotonic() - counted
        soon = max(interval, COUNT_COST_SHARE * cost)
        if since >= count_every or (since >= soon and _counts_moved(partitions)):
            started = time.monotonic()
            try:
                await count_devices(sessions)
                counted, cost = started, time.monotonic() - started
            except Exception as exc:
                log.warning("device count failed: %s", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


def _counts_moved(partitions: ActorPartitions) -> bool:
    """Whether a partition held saw the counts change since the last count (and forget it)."""
    moved = False
    for worker in list(partitions.workers.values()):
        tracker = worker.store.presence
        if tracker is not None and tracker.counts_moved:
            tracker.counts_moved = False
            moved = True
    return moved


async def scan_once(
    js: JetStreamContext,
    sessions: async_sessionmaker[AsyncSession],
    partitions: ActorPartitions,
    now: datetime | None = None,
) -> int:
    """One tick over the partitions held: seed those taken since the last, judge what is
    due; how many findings it published (timeouts and staleness changes)."""
    workers = {i: w for i, w in partitions.workers.items() if w.store.presence is not None}
    unseeded = {i: w.store for i, w in workers.items() if not _tracker(w.store).seeded}
    if unseeded:
        try:
            await seed(sessions, unseeded, partitions.partition)
        except Exception as exc:  # read again next tick; the others are judged meanwhile
            log.warning("presence: reading the partitions taken failed: %s", exc)
    now = now or m.now()
    found = 0
    for index, worker in workers.items():
        if partitions.workers.get(index) is worker:  # still held
            found += await judge_due(js, worker.store, now)
    return found


async def seed(
    sessions: async_sessionmaker[AsyncSession],
    stores: Mapping[int, StateStore],
    partition: Callable[[str], int],
) -> None:
    """Schedule the online devices of these partitions, just taken: one read for all of
    them, in chunks, the event loop let go between chunks."""
    async with sessions() as session:
        rows = await session.stream(_ONLINE.execution_options(yield_per=SEED_CHUNK))
        async for chunk in rows.partitions():
            for row in chunk:
                store = stores.get(partition(row.device_id))
                if store is not None:
                    _seed_one(store, row)
            await asyncio.sleep(0)
    for store in stores.values():
        _tracker(store).seeded = True


def _seed_one(store: StateStore, row: Any) -> None:
    snapshot = m.DeviceSnapshot(
        device_id=row.device_id,
        connection="online",
        last_seen=row.last_seen,
        reported={k: datetime.fromisoformat(v) for k, v in (row.reported or {}).items()},
        stale=list(row.stale or []),
    )
    held, intervals = store.remember(
        row.device_id, standing(row.lifecycle, row.enabled), row.kind, row.report_intervals
    )
    _tracker(store).update(snapshot, held, intervals)


async def judge_due(js: JetStreamContext, store: StateStore, now: datetime) -> int:
    """Judge the devices due in one partition and schedule each again; how many findings
    were published. What is left when a read or a publish fails is looked at next tick."""
    tracker = _tracker(store)
    due = tracker.pop(now.timestamp())
    found = 0
    for start in range(0, len(due), JUDGE_CHUNK):
        chunk = due[start : start + JUDGE_CHUNK]
        try:
            found += await _judge_chunk(js, store, tracker, chunk, now)
        except BaseException:
            _wake(tracker, due[start:])
            raise
        await asyncio.sleep(0)
    return found


async def _judge_chunk(
    js: JetStreamContext,
    store: StateStore,
    tracker: PresenceTracker,
    device_ids: list[str],
    now: datetime,
) -> int:
    snapshots = await store.peek(device_ids)
    online = [d for d, s in snapshots.items() if s.connection == "online"]
    profiles = await store.profiles(online) if online else {}
    found = 0
    for device_id in online:
        held, intervals = profiles[device_id]
        snapshot = snapshots[device_id]
        finding, then = judge(snapshot, held, intervals or {}, tracker.timeout_s, now)
        if finding is not None:
            await bus.publish(js, finding.nats_subject, finding, msg_id=finding.id)
            found += 1
        # Intervals still unknown (its entry just went): not read again before its timeout.
        tracker.update(then, held, intervals or {})
    return found


def _wake(tracker: PresenceTracker, device_ids: Iterable[str]) -> None:
    for device_id in device_ids:
        tracker.wake(device_id)


def _tracker(store: StateStore) -> PresenceTracker:
    assert store.presence is not None
    return store.presence


async def count_devices(sessions: async_sessionmaker[AsyncSession]) -> None:
    """`smarthome_devices` from the database: the same in every replica."""
    async with sessions() as session:
        counts = await device_counts(session)
    for (connection, lifecycle), n in counts.items():
        DEVICES.labels(connection, lifecycle).set(n)


def _timeout(device_id: str, last_seen: datetime) -> m.CloudEvent:
    return m.make_event(
        device_id,
        "presence_timeout",
        {"last_seen": last_seen.isoformat()},
        source="service/actors",
        # Deterministic id: several scanners (or rescans) produce one event.
        event_id=f"timeout-{device_id}-{int(last_seen.timestamp() * 1e6)}",
    )


def _staleness(device_id: str, version: int, found: dict[str, datetime]) -> m.CloudEvent:
    stale = {name: at.isoformat() for name, at in sorted(found.items())}
    # Deterministic id: replicas scanning the same state publish one event; a new report or
    # a new version makes a new finding.
    digest = hashlib.sha256(repr((device_id, version, stale)).encode()).hexdigest()[:40]
    return m.make_event(
        device_id,
        "presence_timeout",
        {"stale": stale},
        source="service/actors",
        event_id=f"stale-{digest}",
    )
