"""How many devices are online, offline or stale, per lifecycle: one query for every reader.

The actors' presence scan sets the gauge `smarthome_devices{connection, lifecycle}` from it;
a status page that counts with it shows the same numbers as `/metrics`.
"""

from __future__ import annotations

from collections import Counter
from typing import get_args

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from libs import messages as m
from libs.db.models import Device, DeviceState
from libs.device_state import presence

# Every (connection, lifecycle) a count has, zeros included.
LABELS = tuple(
    (connection, lifecycle.value)
    for connection in get_args(m.Presence)
    for lifecycle in m.Lifecycle
)


async def device_counts(session: AsyncSession) -> dict[tuple[m.Presence, str], int]:
    """Registered devices per (connection, lifecycle); a device never heard from is offline,
    an online one with an attribute overdue is stale (as the actors last decided)."""
    found: Counter[tuple[str, str]] = Counter()
    per_connection = await session.execute(
        select(Device.lifecycle, DeviceState.connection, func.count())
        .outerjoin(DeviceState, DeviceState.device_id == Device.id)
        .group_by(Device.lifecycle, DeviceState.connection)
    )
    for lifecycle, connection, n in per_connection:
        found[(connection or "offline", lifecycle)] += n
    # Staleness is a JSON list: judged here rather than in SQL that each dialect spells apart.
    online = await session.execute(
        select(Device.lifecycle, DeviceState.stale)
        .join(Device, Device.id == DeviceState.device_id)
        .where(DeviceState.connection == "online")
    )
    for lifecycle, stale in online:
        if presence("online", list(stale or [])) == "stale":
            found[("online", lifecycle)] -= 1
            found[("stale", lifecycle)] += 1
    return {label: found[label] for label in LABELS}
