"""The device registry and what hangs off it: runtime state, commands, history, statistics.

The registry (`devices` table) is written here only; every change is published as a
`RegistryFact` on `system.device.<id>.registry`, through the outbox (`libs.outbox`): written
in the change's transaction, published after its commit. Runtime state is read, never written: the
actors own it (the `device_states` table, and the cache written after it). A move to another
home also publishes the device's `moved` event, with which the actors start its state afresh;
until they applied it, a resident sees only what the device reported in its home
(`scope.state_since_home`).
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

from libs import capabilities, commands, outbox, subjects
from libs import messages as m
from libs.cache import StateCache, order
from libs.db.engine import at_or_under
from libs.db.models import (
    CommandRecord,
    DeviceClaim,
    DeviceState,
    HistoryEntry,
    HourlyStatistic,
)
from libs.db.models import Device as DeviceRow
from libs.device_state import presence
from libs.errors import Conflict, Invalid, NotFound
from libs.principals import Principal, home_of
from services.gateway import scope
from services.gateway.auth.context import Context
from services.gateway.credentials import service as credentials
from services.gateway.devices.schemas import (
    ActionParam,
    AttributeReport,
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
from services.gateway.pagination import decode_cursor, keyset, page
from services.gateway.resources import require_bus

log = logging.getLogger(__name__)

RegistryChange = Literal["created", "updated", "deleted", "connected", "disconnected"]
DISCOVERY_ACTOR = "platform:discovery"
MAX_PENDING = 1000  # devices waiting for approval: a flood of hellos fills no more
# A platform source (`libs.device_state.PLATFORM_SOURCES`): the device did not speak.
MOVE_SOURCE = "service/gateway"


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

    async def create(self, data: DeviceCreate, ctx: Context) -> Device:
        require_bus(self._nc)
        scope.own_location(ctx.principal, data.location, "$.location")
        device_id = data.id or m.new_id()
        async with self._sessions.begin() as session:
            if await session.get(DeviceRow, device_id) is not None:
                raise Conflict(f"device {device_id!r} already exists", field="$.id")
            await check_device_location(session, data.location)
            row = _new_row(
                device_id, data.name, data.kind, m.Lifecycle.ACTIVE, data.location, data.metadata
            )
            row.report_intervals = dict(data.report_intervals)
            await self._add(session, row, ctx.principal.actor, ctx.correlation_id)
            enrolled = await credentials.enroll(
                session, self._js, device_id, data.location, data.bridge, ctx.principal.actor
            )
            if data.bridge is not None:
                credentials.bridge_joined(session, data.bridge, device_id, ctx)
        # A re-registered id may find the state its earlier life left behind.
        device = await self.get(device_id, ctx.principal)
        return device if enrolled is None else msgspec.structs.replace(device, credentials=enrolled)

    async def discover(self, device_id: str, name: str, kind: str) -> bool:
        """Enter a device that said hello unregistered as `pending` (see `discovery`); False
        when it is registered already or too many wait for approval."""
        async with self._sessions() as session:
            found = await session.get(DeviceRow, device_id)
            # A claimed device still waiting for its credentials: again. Looked up here, so
            # that the hellos of a bridge's registered devices (thousands when it connects)
            # cost a read each, not a transaction.
            claimed = (
                found is not None
                and found.lifecycle == m.Lifecycle.ACTIVE
                and await session.get(DeviceClaim, device_id) is not None
            )
        if found is not None:
            if claimed:
                await self._credentials().deliver_claim(device_id, DISCOVERY_ACTOR, again=True)
            return False
        async with self._sessions.begin() as session:
            if await session.get(DeviceRow, device_id) is not None:
                return False
            waiting = select(func.count()).where(DeviceRow.lifecycle == m.Lifecycle.PENDING)
            if (await session.scalar(waiting) or 0) >= MAX_PENDING:
                log.warning(
                    "%s said hello; %d devices already wait: not entered", device_id, MAX_PENDING
                )
                return False
            # A device that claimed its id with a token waits in the token's home.
            home = await credentials.claimed_home(session, device_id)
            row = _new_row(device_id, name, kind, m.Lifecycle.PENDING, home)
            await self._add(session, row, DISCOVERY_ACTOR, m.new_id())
        return True

    def _credentials(self) -> credentials.CredentialService:
        return credentials.CredentialService(self._sessions, self._nc, self._js)

    async def _add(
        self, session: AsyncSession, row: DeviceRow, actor: str, correlation_id: str
    ) -> None:
        session.add(row)
        await session.flush()
        _record(session, row, "created", actor, correlation_id)

    async def get(self, device_id: str, principal: Principal) -> Device:
        async with self._sessions() as session:
            found = (await session.execute(_with_state().where(DeviceRow.id == device_id))).first()
        missing = f"device {device_id!r} is not registered"
        if found is None:
            raise NotFound(missing)
        row, state = found
        scope.visible(principal, home_of(row.location), missing)
        snapshots = await self._snapshots({device_id: state})
        return _device(row, scope.state_since_home(principal, snapshots[device_id], row))

    async def list(
        self, filters: DeviceFilters, limit: int, cursor: str | None, principal: Principal
    ) -> DevicePage:
        query = scope.devices(principal, keyset(_with_state(), DeviceRow.id, limit, cursor))
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
            view=lambda r: _device(
                r[0], scope.state_since_home(principal, snapshots[r[0].id], r[0])
            ),
            into=DevicePage,
        )

    async def update(self, device_id: str, data: DeviceUpdate, ctx: Context) -> Device:
        require_bus(self._nc)
        changes = {
            field: value
            for field, value in msgspec.structs.asdict(data).items()
            if value is not UNSET
        }
        async with self._sessions.begin() as session:
            row = await self._row(session, device_id, ctx.principal)
            if "location" in changes:
                scope.own_location(ctx.principal, changes["location"], "$.location")
                await check_device_location(session, changes["location"])
            changed = False
            moved_home = home_of(changes.get("location", row.location)) != home_of(row.location)
            for field, value in changes.items():
                attribute = "metadata_" if field == "metadata" else field
                if getattr(row, attribute) != value:
                    setattr(row, attribute, value)
                    changed = True
            if changed:
                row.updated_at = m.now()
                _record(session, row, "updated", ctx.principal.actor, ctx.correlation_id)
                if moved_home:  # what it recorded before is not the new home's (to see, or state)
                    row.home_since = row.updated_at
                    _announce_move(session, row, ctx.correlation_id)
        # Approved: if it claimed its id.
        if changed and changes.get("lifecycle") == m.Lifecycle.ACTIVE:
            await self._credentials().deliver_claim(device_id, ctx.principal.actor)
        return await self.get(device_id, ctx.principal)

    async def delete(self, device_id: str, ctx: Context) -> None:
        require_bus(self._nc)
        async with self._sessions.begin() as session:
            row = await self._row(session, device_id, ctx.principal)
            await session.delete(row)
            _record(session, row, "deleted", ctx.principal.actor, ctx.correlation_id)

    async def set_enabled(self, device_id: str, enabled: bool, ctx: Context) -> Device:
        """Attach (`connect`) or detach (`disconnect`) a device; the actors refuse the events
        of a detached device."""
        require_bus(self._nc)
        async with self._sessions.begin() as session:
            row = await self._row(session, device_id, ctx.principal)
            if row.enabled != enabled:
                row.enabled = enabled
                row.updated_at = m.now()
                change = "connected" if enabled else "disconnected"
                _record(session, row, change, ctx.principal.actor, ctx.correlation_id)
        return await self.get(device_id, ctx.principal)

    # --- commands ------------------------------------------------------------------------

    async def send_command(self, device_id: str, data: CommandCreate, ctx: Context) -> CommandView:
        require_bus(self._nc)
        async with self._sessions() as session:
            row = await self._row(session, device_id, ctx.principal)
        if not row.enabled:
            raise Conflict("device is disconnected")
        if row.lifecycle == m.Lifecycle.DECOMMISSIONED:
            raise Conflict("device is decommissioned")
        problem = capabilities.action_problem(row.kind, data.action, data.params)
        if problem is not None:  # refused here, not failed later by the device
            raise Invalid(problem.reason, field=f"$.{problem.field}")
        command = commands.new(
            device_id=device_id,
            action=data.action,
            params=data.params,
            expires_s=data.expires_s,
            issued_by=ctx.principal.actor,
            correlation_id=ctx.correlation_id,
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

    async def get_command(
        self, device_id: str, command_id: str, principal: Principal
    ) -> CommandView:
        async with self._sessions() as session:
            row = await self._row(session, device_id, principal)
            issued = select(CommandRecord).where(
                CommandRecord.id == command_id, CommandRecord.device_id == device_id
            )
            issued = scope.since_home(principal, issued, row, CommandRecord.issued_at)
            record = await session.scalar(issued)
        if record is None:
            raise NotFound(f"device {device_id!r} has no command {command_id!r}")
        return CommandView(
            id=record.id,
            device_id=record.device_id,
            action=record.action,
            params=record.params or {},
            status=commands.effective_status(record),  # type: ignore[arg-type]  # a CommandStatus: the column holds only those
            detail=record.detail,
            issued_by=record.issued_by,
            correlation_id=record.correlation_id,
            issued_at=record.issued_at,
            expires_at=record.expires_at,
            updated_at=record.updated_at,
        )

    # --- history -------------------------------------------------------------------------

    async def history(
        self,
        device_id: str,
        query: HistoryQuery,
        limit: int,
        cursor: str | None,
        principal: Principal,
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
            row = await self._row(session, device_id, principal)
            statement = scope.since_home(principal, statement, row, entry.time)
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
        self,
        device_id: str,
        query: StatisticsQuery,
        limit: int,
        cursor: str | None,
        principal: Principal,
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
            row = await self._row(session, device_id, principal)
            statement = scope.since_home(principal, statement, row, stat.hour)
            rows = list(await session.scalars(statement))
        return page(
            rows, limit, key=lambda r: (r.hour, r.attribute), view=_statistic, into=StatisticsPage
        )

    # --- internals -----------------------------------------------------------------------

    async def _row(self, session: AsyncSession, device_id: str, principal: Principal) -> DeviceRow:
        """The device, if the principal sees it; else 404 as if it were not registered."""
        row = await session.get(DeviceRow, device_id)
        missing = f"device {device_id!r} is not registered"
        if row is None:
            raise NotFound(missing)
        scope.visible(principal, home_of(row.location), missing)
        return row

    async def _snapshots(
        self, states: dict[str, DeviceState | None]
    ) -> dict[str, m.DeviceSnapshot]:
        """Runtime state: the database row (read with the registry entry), or the cached
        state where it is newer, else a device never heard from.

        The actors commit before they write the cache, so a cached state newer than the row
        is one committed since the row was read; an older one (a cache restored from an old
        snapshot, or one the actors could not write for a while) is never shown, and neither
        is a cached state of a device without a row (deleted while the cache was down)."""
        cached: dict[str, bytes] = {}
        try:
            cached = await self._cache.get_many([d for d, s in states.items() if s is not None])
        except Exception as exc:  # the cache is an accelerator: the database is the truth
            log.warning("state cache unavailable, reading the database: %s", exc)
        out = {}
        for device_id, state in states.items():
            if state is None:
                out[device_id] = m.DeviceSnapshot(device_id=device_id)
                continue
            snapshot = state.snapshot()
            if device_id in cached:
                try:
                    hot = m.snapshot_decoder.decode(cached[device_id])
                except msgspec.DecodeError as exc:
                    log.warning("ignoring unreadable cache entry of %s: %s", device_id, exc)
                else:
                    if order(hot) > order(snapshot):
                        snapshot = hot
            out[device_id] = snapshot
        return out


def _record(
    session: AsyncSession, row: DeviceRow, change: RegistryChange, actor: str, correlation_id: str
) -> None:
    """The registry fact of the change, in its transaction (published after the commit)."""
    fact = m.RegistryFact(
        device_id=row.id,
        change=m.RegistryChange(change),
        actor=actor,
        correlation_id=correlation_id,
        time=m.now(),
        device=m.RegistryEntry(**registry_fields(row)),
    )
    outbox.add(session, subjects.device_registry(row.id), fact)


def _announce_move(session: AsyncSession, row: DeviceRow, correlation_id: str) -> None:
    """The device's `moved` event, in the move's transaction (published after the commit,
    after its registry fact): on the device's own subject, so that the actors apply it in
    order with its readings and its state starts afresh in its new home. Dated at the
    placement, so that it is the new home's (`libs.homes`)."""
    data = msgspec.to_builtins(m.MovedData(home=home_of(row.location)))
    event = m.make_event(row.id, m.MOVED, data, source=MOVE_SOURCE, correlation_id=correlation_id)
    event = msgspec.structs.replace(event, time=row.home_since)
    outbox.add(session, event.nats_subject, event, msg_id=event.id)


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
        report_intervals={},
        created_at=now,
        updated_at=now,
        # An id registered again may find its earlier life's records: not this one's.
        home_since=now,
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
    intervals = capabilities.report_intervals(row.kind, row.report_intervals)
    # What the actors last decided (after the presence scan), as the rules and the gauge
    # see it; staleness is an online device's only.
    stale = set(snapshot.stale) if snapshot.connection == "online" else set()
    return Device(
        **registry_fields(row),
        state=snapshot.state,
        connection=snapshot.connection,
        attributes=snapshot.attributes,
        last_seen=snapshot.last_seen,
        version=snapshot.version,
        actions=_actions(row.kind),
        report_intervals=dict(row.report_intervals or {}),
        reports={
            name: AttributeReport(at, intervals.get(name), name in stale)
            for name, at in sorted(snapshot.reported.items())
        },
        presence=presence(snapshot.connection, sorted(stale)),
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
