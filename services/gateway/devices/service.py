"""The device registry and what hangs off it: runtime state, commands, history, statistics.

The registry (`devices` table) is written here only; every change is published as a
`RegistryFact` on `system.device.<id>.registry`. Runtime state is read, never written: the
actors own it (cache first, then the `device_states` table).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import msgspec
from msgspec import UNSET
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from sqlalchemy import Select, and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import bus, capabilities, commands, subjects
from libs import messages as m
from libs.cache import StateCache
from libs.db.engine import at_or_under
from libs.db.models import CommandRecord, DeviceState, HistoryEntry, HourlyStatistic
from libs.db.models import Device as DeviceRow
from libs.errors import Conflict, Invalid, NotFound
from services.gateway.devices.schemas import (
    ActionParam,
    CommandCreate,
    CommandView,
    Device,
    DeviceAction,
    DeviceCreate,
    DevicePage,
    DeviceUpdate,
    HistoryItem,
    HistoryPage,
    StatisticItem,
    StatisticsPage,
)
from services.gateway.locations.service import check_device_location
from services.gateway.pagination import decode_cursor, page
from services.gateway.resources import require_bus

log = logging.getLogger(__name__)

RegistryChange = Literal["created", "updated", "deleted", "connected", "disconnected"]
DISCOVERY_ACTOR = "platform:discovery"
MAX_PENDING = 1000  # devices waiting for approval: a flood of hellos fills no more


@dataclass(frozen=True)
class DeviceFilters:
    kind: str | None = None
    location: str | None = None  # a path prefix: `home/ground` matches `home/ground/kitchen`
    state: m.DeviceStateName | None = None
    connection: m.Connection | None = None
    lifecycle: str | None = None


@dataclass(frozen=True)
class HistoryQuery:
    since: datetime | None = None
    until: datetime | None = None
    type: str | None = None


@dataclass(frozen=True)
class StatisticsQuery:
    attribute: str | None = None
    since: datetime | None = None  # on the hour's start, like `until`
    until: datetime | None = None


class DeviceService:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        nc: NATS,
        js: JetStreamContext,
        cache: StateCache,
    ) -> None:
        self._sessions = sessions
        self._nc = nc
        self._js = js
        self._cache = cache

    # --- registry ------------------------------------------------------------------------

    async def create(self, data: DeviceCreate, *, actor: str, correlation_id: str) -> Device:
        require_bus(self._nc)
        device_id = data.id or m.new_id()
        async with self._sessions.begin() as session:
            if await session.get(DeviceRow, device_id) is not None:
                raise Conflict(f"device {device_id!r} already exists", field="$.id")
            await check_device_location(session, data.location)
            row = _new_row(device_id, data.name, data.kind, "active", data.location, data.metadata)
            await self._add(session, row, actor, correlation_id)
        # A re-registered id may find the state its earlier life left behind.
        return await self.get(device_id)

    async def discover(self, device_id: str, name: str, kind: str) -> bool:
        """Enter a device that said hello unregistered as `pending` (see `discovery`); False
        when it is registered already or too many wait for approval."""
        async with self._sessions.begin() as session:
            if await session.get(DeviceRow, device_id) is not None:
                return False
            waiting = select(func.count()).where(DeviceRow.lifecycle == "pending")
            if (await session.scalar(waiting) or 0) >= MAX_PENDING:
                log.warning(
                    "%s said hello; %d devices already wait: not entered", device_id, MAX_PENDING
                )
                return False
            row = _new_row(device_id, name, kind, "pending")
            await self._add(session, row, DISCOVERY_ACTOR, m.new_id())
        return True

    async def _add(
        self, session: AsyncSession, row: DeviceRow, actor: str, correlation_id: str
    ) -> None:
        session.add(row)
        # Publish inside the transaction: if the bus refuses, nothing is stored.
        await session.flush()
        await self._publish(row, "created", actor, correlation_id)

    async def get(self, device_id: str) -> Device:
        async with self._sessions() as session:
            found = (await session.execute(_with_state().where(DeviceRow.id == device_id))).first()
        if found is None:
            raise NotFound(f"device {device_id!r} is not registered")
        row, state = found
        snapshots = await self._snapshots({device_id: state})
        return _device(row, snapshots[device_id])

    async def list(self, filters: DeviceFilters, limit: int, cursor: str | None) -> DevicePage:
        query = _with_state().order_by(DeviceRow.id).limit(limit + 1)
        if cursor:
            query = query.where(DeviceRow.id > decode_cursor(cursor, str))
        if filters.kind:
            query = query.where(DeviceRow.kind == filters.kind)
        if filters.lifecycle:
            query = query.where(DeviceRow.lifecycle == filters.lifecycle)
        if filters.location:
            query = query.where(at_or_under(DeviceRow.location, filters.location.rstrip("/")))
        if filters.state:
            query = query.where(func.coalesce(DeviceState.state, "off") == filters.state)
        if filters.connection:
            query = query.where(
                func.coalesce(DeviceState.connection, "offline") == filters.connection
            )
        async with self._sessions() as session:
            rows = [(row, state) for row, state in (await session.execute(query)).all()]
        snapshots = await self._snapshots({row.id: state for row, state in rows[:limit]})
        return page(
            rows,
            limit,
            key=lambda r: r[0].id,
            view=lambda r: _device(r[0], snapshots[r[0].id]),
            into=DevicePage,
        )

    async def update(
        self, device_id: str, data: DeviceUpdate, *, actor: str, correlation_id: str
    ) -> Device:
        require_bus(self._nc)
        changes = {
            field: value
            for field, value in msgspec.structs.asdict(data).items()
            if value is not UNSET
        }
        async with self._sessions.begin() as session:
            row = await self._row(session, device_id)
            if "location" in changes:
                await check_device_location(session, changes["location"])
            changed = False
            for field, value in changes.items():
                attribute = "metadata_" if field == "metadata" else field
                if getattr(row, attribute) != value:
                    setattr(row, attribute, value)
                    changed = True
            if changed:
                row.updated_at = m.now()
                await session.flush()
                await self._publish(row, "updated", actor, correlation_id)
        return await self.get(device_id)

    async def delete(self, device_id: str, *, actor: str, correlation_id: str) -> None:
        require_bus(self._nc)
        async with self._sessions.begin() as session:
            row = await self._row(session, device_id)
            await session.delete(row)
            await session.flush()
            await self._publish(row, "deleted", actor, correlation_id)

    async def set_enabled(
        self, device_id: str, enabled: bool, *, actor: str, correlation_id: str
    ) -> Device:
        """Attach (`connect`) or detach (`disconnect`) a device; the actors refuse the events
        of a detached device."""
        require_bus(self._nc)
        async with self._sessions.begin() as session:
            row = await self._row(session, device_id)
            if row.enabled != enabled:
                row.enabled = enabled
                row.updated_at = m.now()
                await session.flush()
                change = "connected" if enabled else "disconnected"
                await self._publish(row, change, actor, correlation_id)
        return await self.get(device_id)

    # --- commands ------------------------------------------------------------------------

    async def send_command(
        self, device_id: str, data: CommandCreate, *, actor: str, correlation_id: str
    ) -> CommandView:
        require_bus(self._nc)
        async with self._sessions() as session:
            row = await self._row(session, device_id)
        if not row.enabled:
            raise Conflict("device is disconnected")
        if row.lifecycle == "decommissioned":
            raise Conflict("device is decommissioned")
        problem = capabilities.action_problem(row.kind, data.action, data.params)
        if problem is not None:  # refused here, not failed later by the device
            raise Invalid(problem.reason, field=f"$.{problem.field}")
        command = commands.new(
            device_id=device_id,
            action=data.action,
            params=data.params,
            expires_s=data.expires_s,
            issued_by=actor,
            correlation_id=correlation_id,
        )
        await commands.send(self._sessions, self._js, command)
        return CommandView(
            id=command.id,
            device_id=device_id,
            action=command.action,
            params=command.params,
            status="pending",
            detail=None,
            issued_by=command.issued_by,
            correlation_id=command.correlation_id,
            issued_at=command.issued_at,
            expires_at=command.expires_at,
            updated_at=command.issued_at,
        )

    async def get_command(self, device_id: str, command_id: str) -> CommandView:
        async with self._sessions() as session:
            record = await session.get(CommandRecord, command_id)
        if record is None or record.device_id != device_id:
            raise NotFound(f"device {device_id!r} has no command {command_id!r}")
        return CommandView(
            id=record.id,
            device_id=record.device_id,
            action=record.action,
            params=record.params or {},
            status=commands.effective_status(record),  # type: ignore[arg-type]
            detail=record.detail,
            issued_by=record.issued_by,
            correlation_id=record.correlation_id,
            issued_at=record.issued_at,
            expires_at=record.expires_at,
            updated_at=record.updated_at,
        )

    # --- history -------------------------------------------------------------------------

    async def history(
        self, device_id: str, query: HistoryQuery, limit: int, cursor: str | None
    ) -> HistoryPage:
        """Newest last; `since` inclusive, `until` exclusive."""
        entry = HistoryEntry
        statement = (
            select(entry)
            .where(entry.device_id == device_id)
            .order_by(entry.time, entry.id)
            .limit(limit + 1)
        )
        if query.since:
            statement = statement.where(entry.time >= query.since)
        if query.until:
            statement = statement.where(entry.time < query.until)
        if query.type:
            statement = statement.where(entry.type == query.type)
        if cursor:
            time, last_id = decode_cursor(cursor, tuple[datetime, int])
            statement = statement.where(
                or_(entry.time > time, and_(entry.time == time, entry.id > last_id))
            )
        async with self._sessions() as session:
            await self._row(session, device_id)
            rows = list(await session.scalars(statement))
        return page(
            rows,
            limit,
            key=lambda r: (r.time, r.id),
            view=lambda r: HistoryItem(
                time=r.time, type=r.type, data=r.data or {}, stream=r.stream, seq=r.source_seq
            ),
            into=HistoryPage,
        )

    async def statistics(
        self, device_id: str, query: StatisticsQuery, limit: int, cursor: str | None
    ) -> StatisticsPage:
        """Oldest first; an hour is in when its start is at or after `since`, before `until`."""
        if query.since and query.until and query.since > query.until:
            raise Invalid("is after `until`", field="since")
        stat = HourlyStatistic
        statement = (
            select(stat)
            .where(stat.device_id == device_id)
            .order_by(stat.hour, stat.attribute)
            .limit(limit + 1)
        )
        if query.attribute:
            statement = statement.where(stat.attribute == query.attribute)
        if query.since:
            statement = statement.where(stat.hour >= query.since)
        if query.until:
            statement = statement.where(stat.hour < query.until)
        if cursor:
            hour, attribute = decode_cursor(cursor, tuple[datetime, str])
            statement = statement.where(
                or_(stat.hour > hour, and_(stat.hour == hour, stat.attribute > attribute))
            )
        async with self._sessions() as session:
            await self._row(session, device_id)
            rows = list(await session.scalars(statement))
        return page(
            rows, limit, key=lambda r: (r.hour, r.attribute), view=_statistic, into=StatisticsPage
        )

    # --- internals -----------------------------------------------------------------------

    async def _row(self, session: AsyncSession, device_id: str) -> DeviceRow:
        row = await session.get(DeviceRow, device_id)
        if row is None:
            raise NotFound(f"device {device_id!r} is not registered")
        return row

    async def _publish(
        self, row: DeviceRow, change: RegistryChange, actor: str, correlation_id: str
    ) -> None:
        fact = m.RegistryFact(
            device_id=row.id,
            change=change,
            actor=actor,
            correlation_id=correlation_id,
            time=m.now(),
            device=registry_fields(row),
        )
        await bus.publish(self._js, subjects.device_registry(row.id), fact, msg_id=m.new_id())

    async def _snapshots(
        self, states: dict[str, DeviceState | None]
    ) -> dict[str, m.DeviceSnapshot]:
        """Runtime state: the cache, else the database row, else a device never heard from."""
        cached: dict[str, bytes] = {}
        try:
            cached = await self._cache.get_many(list(states))
        except Exception as exc:  # the cache is an accelerator: the database is the truth
            log.warning("state cache unavailable, reading the database: %s", exc)
        out = {}
        for device_id, state in states.items():
            snapshot = None
            if device_id in cached:
                try:
                    snapshot = m.snapshot_decoder.decode(cached[device_id])
                except msgspec.DecodeError as exc:
                    log.warning("ignoring unreadable cache entry of %s: %s", device_id, exc)
            if snapshot is None and state is not None:
                snapshot = state.snapshot()
            out[device_id] = snapshot or m.DeviceSnapshot(device_id=device_id)
        return out


def _new_row(
    device_id: str,
    name: str,
    kind: str,
    lifecycle: str,
    location: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> DeviceRow:
    now = m.now()
    return DeviceRow(
        id=device_id,
        name=name,
        kind=kind,
        location=location,
        lifecycle=lifecycle,
        enabled=True,
        metadata_=dict(metadata or {}),
        created_at=now,
        updated_at=now,
    )


def registry_fields(row: DeviceRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "kind": row.kind,
        "location": row.location,
        "lifecycle": row.lifecycle,
        "enabled": row.enabled,
        "metadata": row.metadata_ or {},
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }


def _with_state() -> Select[tuple[DeviceRow, DeviceState]]:
    return select(DeviceRow, DeviceState).outerjoin(
        DeviceState, DeviceState.device_id == DeviceRow.id
    )


def _device(row: DeviceRow, snapshot: m.DeviceSnapshot) -> Device:
    return Device(
        **registry_fields(row),
        state=snapshot.state,
        connection=snapshot.connection,
        attributes=snapshot.attributes,
        last_seen=snapshot.last_seen,
        version=snapshot.version,
        actions=_actions(row.kind),
    )


def _statistic(row: HourlyStatistic) -> StatisticItem:
    return StatisticItem(
        hour=row.hour,
        attribute=row.attribute,
        count=row.count,
        mean=row.mean,
        min=row.min,
        max=row.max,
        last=row.last,
        last_time=row.last_time,
    )


def _actions(kind: str) -> list[DeviceAction] | None:
    specs = capabilities.KINDS.get(kind)
    if specs is None:
        return None
    return [
        DeviceAction(
            spec.name,
            [ActionParam(p.name, p.expected, p.integer, p.low, p.high) for p in spec.params],
        )
        for spec in specs
    ]
