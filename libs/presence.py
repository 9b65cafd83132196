"""How many devices are online, offline or stale, per lifecycle: one query for every reader.

The actors' presence scan sets the gauge `smarthome_devices{connection, lifecycle}` from it
(once a minute); a status page that counts with it shows the same numbers as `/metrics`.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import get_args

from sqlalchemy import String, cast, func, select
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
    # Staleness is a JSON list: judged here rather than in SQL that each dialect spells apart,
    # on the few distinct lists (as text: JSON has no equality to group by), not on each row.
    stale_text = cast(DeviceState.stale, String)
    online = await session.execute(
        select(Device.lifecycle, stale_text, func.count())
        .join(Device, Device.id == DeviceState.device_id)
        .where(DeviceState.connection == "online")
        .group_by(Device.lifecycle, stale_text)
    )
    for lifecycle, stale, n in online:
        if presence("online", list(json.loads(stale) if stale else [])) == "stale":
            found[("online", lifecycle)] -= n
            found[("stale", lifecycle)] += n
    return {label: found[label] for label in LABELS}
