"""Heartbeat timeout: a device silent for longer than the timeout goes offline.

The scanner does not write state itself: it publishes a `presence_timeout` event on the
device's own subject, so the change is applied in order with the device's other events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta

from nats.js import JetStreamContext
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import bus
from libs import messages as m
from libs.db.models import DeviceState

log = logging.getLogger(__name__)


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
    cutoff = m.now() - timedelta(seconds=timeout_s)
    async with sessions() as session:
        rows = (
            await session.execute(
                select(DeviceState.device_id, DeviceState.last_seen).where(
                    DeviceState.connection == "online", DeviceState.last_seen < cutoff
                )
            )
        ).all()
    for device_id, last_seen in rows:
        event = m.make_event(
            device_id,
            "presence_timeout",
            {"last_seen": last_seen.isoformat()},
            source="service/actors",
            # Deterministic id: several scanners (or rescans) produce one event.
            event_id=f"timeout-{device_id}-{int(last_seen.timestamp() * 1e6)}",
        )
        await bus.publish(js, event.nats_subject, event, msg_id=event.id)
    return len(rows)
