"""Where device state lives: the cache first, then the database (the truth)."""

from __future__ import annotations

from typing import Any, Literal

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import commands
from libs import messages as m
from libs.cache import StateCache
from libs.db.engine import insert_ignoring_duplicates, upsert
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


# Whether a registered device's events are applied: only an `active` one's are.
Standing = Literal["active", "disconnected", "pending", "rejected"]


def standing(lifecycle: str, enabled: bool) -> Standing | None:
    """A registry entry's standing; None for a decommissioned device (as if unregistered)."""
    if lifecycle == "decommissioned":
        return None
    if lifecycle in ("pending", "rejected"):
        return lifecycle  # type: ignore[return-value]
    return "active" if enabled else "disconnected"


class StateStore:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], cache: StateCache) -> None:
        self._sessions = sessions
        self._cache = cache
        self._standing: dict[str, Standing | None] = {}  # None: known not to be registered
        self._upsert_statement: Any = None  # built on first use: it needs the dialect

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
                found.update({r.device_id: r.snapshot() for r in rows})
        return {d: found.get(d) or DeviceSnapshot(device_id=d) for d in device_ids}

    async def registry(self, device_ids: list[str]) -> dict[str, Standing]:
        """The standing of each registered device (absent: not registered, or decommissioned).

        Known devices are answered from memory, kept up to date by the registry facts
        (`learn`). Unknown ones are asked for every time (they may register any moment).
        """
        missing = [d for d in device_ids if d not in self._standing]
        if missing:
            async with self._sessions() as session:
                rows = await session.execute(
                    select(Device.id, Device.lifecycle, Device.enabled).where(
                        Device.id.in_(missing)
                    )
                )
                self._standing.update({d: standing(life, on) for d, life, on in rows})
        return {d: s for d in device_ids if (s := self._standing.get(d)) is not None}

    def learn(self, device_id: str, standing: Standing | None) -> None:
        """What a registry fact says (None: deleted). Not read from the database: the gateway
        publishes the fact before its transaction commits, and a read now could find the
        entry as it was, and keep it."""
        self._standing[device_id] = standing

    def forget(self, device_id: str) -> None:
        self._standing.pop(device_id, None)

    async def drop(self, device_id: str) -> None:
        """A deleted device leaves no state behind for a later device of the same id."""
        async with self._sessions.begin() as session:
            await session.execute(delete(DeviceState).where(DeviceState.device_id == device_id))
        await self._cache.delete(device_id)

    async def save(
        self,
        snapshots: list[DeviceSnapshot],
        statuses: list[tuple[str, m.CommandStatusData]],
    ) -> None:
        """Write snapshots and command statuses in one transaction, then the cache."""
        async with self._sessions.begin() as session:
            await self._upsert(session, snapshots)
            for device_id, status in statuses:
                await self._status(session, device_id, status)
        await self._cache.put_many({s.device_id: m.encode(s) for s in snapshots})

    @staticmethod
    async def _status(session: AsyncSession, device_id: str, status: m.CommandStatusData) -> None:
        """Move the command's status forward; a status that comes before the command's record
        (a rule publishes a command first) is kept in a stand-in row the record fills in."""
        moved = await session.execute(
            update(CommandRecord)
            .where(
                CommandRecord.id == status.command_id,
                CommandRecord.device_id == device_id,
                CommandRecord.status.in_(NEXT_STATUS[status.status]),
            )
            .values(status=status.status, detail=status.detail, updated_at=m.now())
        )
        if moved.rowcount == 0:  # not recorded yet, or already past this status
            stand_in = insert_ignoring_duplicates(session.bind, CommandRecord.__table__)  # type: ignore[arg-type]
            await session.execute(stand_in, [commands.stand_in(device_id, status)])

    async def _upsert(self, session: AsyncSession, snapshots: list[DeviceSnapshot]) -> None:
        if snapshots:
            if self._upsert_statement is None:
                # Built once: constructing it costs more than executing it for a few rows.
                self._upsert_statement = upsert(session.bind, DeviceState.__table__, "device_id")  # type: ignore[arg-type]
            await session.execute(self._upsert_statement, [to_row(s) for s in snapshots])
