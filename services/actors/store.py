"""Where device state lives: the cache first, then the database (the truth)."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import messages as m
from libs.cache import StateCache
from libs.db.models import CommandRecord, Device, DeviceState
from libs.messages import DeviceSnapshot

# Which command status may follow which: a late `delivered` never undoes `done`.
NEXT_STATUS = {
    "delivered": ("pending",),
    "done": ("pending", "delivered"),
    "failed": ("pending", "delivered"),
    "expired": ("pending", "delivered"),
}


def to_row(s: DeviceSnapshot) -> dict:
    return {
        "device_id": s.device_id,
        "state": s.state,
        "mark": s.mark,
        "connection": s.connection,
        "attributes": s.attributes,
        "last_seen": s.last_seen,
        "version": s.version,
        "last_seq": s.last_seq,
        "updated_at": m.now(),
    }


def from_row(row: DeviceState) -> DeviceSnapshot:
    return DeviceSnapshot(
        device_id=row.device_id,
        state=row.state,  # type: ignore[arg-type]
        mark=row.mark,  # type: ignore[arg-type]
        connection=row.connection,  # type: ignore[arg-type]
        attributes=row.attributes or {},
        last_seen=row.last_seen,
        version=row.version,
        last_seq=row.last_seq,
    )


class StateStore:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], cache: StateCache) -> None:
        self._sessions = sessions
        self._cache = cache

    async def load(self, device_ids: list[str]) -> dict[str, DeviceSnapshot]:
        """Snapshots for these devices; a device never seen starts empty."""
        cached = await self._cache.get_many(device_ids)
        found = {d: m.snapshot_decoder.decode(v) for d, v in cached.items()}
        missing = [d for d in device_ids if d not in found]
        if missing:
            async with self._sessions() as session:
                rows = await session.scalars(
                    select(DeviceState).where(DeviceState.device_id.in_(missing))
                )
                found.update({r.device_id: from_row(r) for r in rows})
        return {d: found.get(d) or DeviceSnapshot(device_id=d) for d in device_ids}

    async def registry(self, device_ids: list[str]) -> dict[str, bool]:
        """`enabled` of each registered device (absent: not registered)."""
        async with self._sessions() as session:
            rows = await session.execute(
                select(Device.id, Device.enabled).where(
                    Device.id.in_(device_ids), Device.lifecycle != "decommissioned"
                )
            )
            return {device_id: enabled for device_id, enabled in rows}

    async def save(
        self,
        snapshots: list[DeviceSnapshot],
        statuses: list[tuple[str, m.CommandStatusData]],
    ) -> None:
        """Write snapshots and command statuses in one transaction, then the cache."""
        async with self._sessions.begin() as session:
            await self._upsert(session, snapshots)
            for device_id, status in statuses:
                await session.execute(
                    update(CommandRecord)
                    .where(
                        CommandRecord.id == status.command_id,
                        CommandRecord.device_id == device_id,
                        CommandRecord.status.in_(NEXT_STATUS[status.status]),
                    )
                    .values(status=status.status, detail=status.detail, updated_at=m.now())
                )
        await self._cache.put_many({s.device_id: m.encode(s) for s in snapshots})

    async def _upsert(self, session: AsyncSession, snapshots: list[DeviceSnapshot]) -> None:
        if not snapshots:
            return
        ids = [s.device_id for s in snapshots]
        existing = set(
            await session.scalars(
                select(DeviceState.device_id).where(DeviceState.device_id.in_(ids))
            )
        )
        new_rows = [to_row(s) for s in snapshots if s.device_id not in existing]
        old_rows = [to_row(s) for s in snapshots if s.device_id in existing]
        if new_rows:
            await session.execute(DeviceState.__table__.insert(), new_rows)
        if old_rows:
            await session.execute(update(DeviceState), old_rows)
