"""Presence: a device silent for longer than the heartbeat timeout goes offline, and an
online device's attribute not reported for longer than expected is stale.

The scanner does not write state itself: it publishes a `presence_timeout` event on the
device's own subject, so the change is applied in order with the device's other events (a
report that came after the scan wins) and announced by the actors' state fact, which the
rules read. An attribute turns fresh again when the device reports it: the actors see that
without a scan.

Each scan also sets `smarthome_devices{connection, lifecycle}` from the database
(`libs.presence`), so every actors replica reports the same platform-wide count (the alerts
read it with `max`); every combination is set, zeros too, so a count that drops to none
reads 0 rather than vanishing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from nats.js import JetStreamContext
from prometheus_client import Gauge
from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import bus, capabilities
from libs import messages as m
from libs.db.models import Device, DeviceState
from libs.device_state import overdue
from libs.presence import device_counts

log = logging.getLogger(__name__)

# Online devices are judged this many at a time, read from a cursor: the event loop, which
# the partitions' batches share, is never held for a whole fleet's rows at once.
SCAN_CHUNK = 50

_ONLINE = (
    select(
        DeviceState.device_id,
        DeviceState.version,
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


async def scan_forever(
    js: JetStreamContext,
    sessions: async_sessionmaker[AsyncSession],
    timeout_s: float,
    stop: asyncio.Event,
) -> None:
    interval = max(timeout_s / 3, 0.5)
    while not stop.is_set():
        try:
            await scan_once(js, sessions, timeout_s)
        except Exception as exc:  # the next scan tries again; presence is not worth a crash
            log.warning("presence scan failed: %s", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


async def scan_once(
    js: JetStreamContext, sessions: async_sessionmaker[AsyncSession], timeout_s: float
) -> int:
    """One scan; how many findings it published (timeouts and staleness changes)."""
    now = m.now()
    cutoff = now - timedelta(seconds=timeout_s)
    async with sessions() as session:
        silent = (
            await session.execute(
                select(DeviceState.device_id, DeviceState.last_seen).where(
                    DeviceState.connection == "online", DeviceState.last_seen < cutoff
                )
            )
        ).all()
        counts = await device_counts(session)
        events = [_timeout(device_id, seen) for device_id, seen in silent if seen is not None]
        timed_out = {device_id for device_id, _ in silent}
        online = await session.stream(_ONLINE.execution_options(yield_per=SCAN_CHUNK))
        async for rows in online.partitions():
            events += _staleness_changes(rows, timed_out, now)
    for (connection, lifecycle), n in counts.items():
        DEVICES.labels(connection, lifecycle).set(n)
    for event in events:
        await bus.publish(js, event.nats_subject, event, msg_id=event.id)
    return len(events)


def _staleness_changes(
    rows: Sequence[Row[*tuple[Any, ...]]], timed_out: set[str], now: datetime
) -> list[m.CloudEvent]:
    """A staleness event for each of these online devices whose overdue attributes changed."""
    events = []
    for row in rows:
        if row.device_id in timed_out or row.lifecycle != m.Lifecycle.ACTIVE or not row.enabled:
            continue  # going offline says more; a device not applied is not judged
        intervals = capabilities.report_intervals(row.kind, row.report_intervals)
        if not intervals and not row.stale:
            continue
        reported = {k: datetime.fromisoformat(v) for k, v in (row.reported or {}).items()}
        found = overdue(intervals, reported, now)
        if sorted(found) != sorted(row.stale or []):
            events.append(_staleness(row.device_id, row.version, found))
    return events


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
