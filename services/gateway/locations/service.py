"""Homes, floors and rooms: a tree whose paths (`home/ground/kitchen`) devices name as their
`location`. Every change is published as a `system.location.<id>` fact (the audit log).

A device's location is a free path until its home is defined here; from then on it must be
one of that home's locations, so that a typo does not put a device in a room nobody sees.
"""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import messages as m
from libs import subjects
from libs.db.engine import at_or_under
from libs.db.models import Device as DeviceRow
from libs.db.models import Location as LocationRow
from libs.errors import Conflict, Invalid, NotFound
from libs.principals import Principal, home_of
from services.gateway import scope
from services.gateway.auth.context import Context
from services.gateway.changes import Change, record_change
from services.gateway.locations.schemas import (
    Location,
    LocationCreate,
    LocationPage,
    LocationUpdate,
)
from services.gateway.pagination import keyset, page
from services.gateway.resources import require_bus

# What each kind may be in: a home is the root; rooms may skip the floor.
PARENT_KINDS = {"home": (), "floor": ("home",), "room": ("home", "floor")}
KNOWN_SHOWN = 10  # locations named in the error for a device location that is not one


class LocationService:
    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], nc: NATS, js: JetStreamContext
    ) -> None:
        self._sessions = sessions
        self._nc = nc
        self._js = js

    async def create(self, data: LocationCreate, ctx: Context) -> Location:
        require_bus(self._nc)
        principal = ctx.principal
        if data.kind == "home" and not principal.is_admin and not principal.sees(data.id):
            # An installer defines the homes it was given, by their ids.
            raise Invalid(
                f"a home you define has the id of one of yours "
                f"({', '.join(sorted(principal.homes or ())) or 'none'})",
                field="$.id",
            )
        location_id = data.id or m.new_id()
        async with self._sessions.begin() as session:
            if await session.get(LocationRow, location_id) is not None:
                raise Conflict(f"location {location_id!r} already exists", field="$.id")
            parent = await _parent(session, data, principal)
            row = LocationRow(
                id=location_id,
                name=data.name,
                kind=data.kind,
                parent_id=data.parent_id,
                path=f"{parent.path}/{location_id}" if parent else location_id,
                created_at=m.now(),
            )
            session.add(row)
            await session.flush()
            _record(session, row, "created", ctx)
            return _view(row)

    async def get(self, location_id: str, principal: Principal) -> Location:
        async with self._sessions() as session:
            return _view(await _row(session, location_id, principal))

    async def list(
        self,
        parent_id: str | None,
        kind: str | None,
        limit: int,
        cursor: str | None,
        principal: Principal,
    ) -> LocationPage:
        query = keyset(select(LocationRow), LocationRow.path, limit, cursor)
        query = scope.paths(principal, query, LocationRow.path)
        if parent_id:
            query = query.where(LocationRow.parent_id == parent_id)
        if kind:
            query = query.where(LocationRow.kind == kind)
        async with self._sessions() as session:
            rows = list((await session.scalars(query)).all())
        return page(rows, limit, key=lambda r: r.path, view=_view, into=LocationPage)

    async def update(self, location_id: str, data: LocationUpdate, ctx: Context) -> Location:
        require_bus(self._nc)
        async with self._sessions.begin() as session:
            row = await _row(session, location_id, ctx.principal)
            if row.name != data.name:
                row.name = data.name
                _record(session, row, "updated", ctx)
            return _view(row)

    async def delete(self, location_id: str, ctx: Context) -> None:
        """Only an empty location goes: its rooms and devices would be left nowhere."""
        require_bus(self._nc)
        async with self._sessions.begin() as session:
            row = await _row(session, location_id, ctx.principal)
            inside = await session.scalar(
                select(func.count()).where(LocationRow.parent_id == location_id)
            )
            if inside:
                raise Conflict(
                    f"location {location_id!r} holds {inside} location(s): delete them first"
                )
            devices = await session.scalar(
                select(func.count()).where(at_or_under(DeviceRow.location, row.path))
            )
            if devices:
                raise Conflict(f"{devices} device(s) are in {row.path!r}: move them first")
            await session.delete(row)
            _record(session, row, "deleted", ctx)


def _record(session: AsyncSession, row: LocationRow, change: Change, ctx: Context) -> None:
    """The fact of the change, in its transaction (published after the commit)."""
    record_change(
        session,
        subjects.location_changed(row.id),
        "location",
        row.id,
        change,
        actor=ctx.principal.actor,
        correlation_id=ctx.correlation_id,
        detail=_fields(row),
        home=home_of(row.path),
    )


async def check_device_location(session: AsyncSession, path: str | None) -> None:
    """422 naming `$.location` when the path's home is defined and the path is none of its
    locations (see the module docstring)."""
    if path is None:
        return
    home = path.split("/", 1)[0]
    home_row = await session.get(LocationRow, home)
    if home_row is None or home_row.kind != "home":
        return  # not a defined home: a free path
    if await session.scalar(select(func.count()).where(LocationRow.path == path)):
        return
    known = (
        await session.scalars(
            select(LocationRow.path)
            .where(at_or_under(LocationRow.path, home))
            .order_by(LocationRow.path)
            .limit(KNOWN_SHOWN)
        )
    ).all()
    raise Invalid(
        f"{path!r} is not a location of home {home!r} (it has: {', '.join(known)})",
        field="$.location",
    )


async def _parent(
    session: AsyncSession, data: LocationCreate, principal: Principal
) -> LocationRow | None:
    allowed = PARENT_KINDS[data.kind]
    if not allowed:
        if data.parent_id is not None:
            raise Invalid("a home is not inside another location", field="$.parent_id")
        return None
    if data.parent_id is None:
        raise Invalid(
            f"a {data.kind} needs a parent_id ({' or '.join(allowed)})", field="$.parent_id"
        )
    parent = await session.get(LocationRow, data.parent_id)
    if parent is None or not principal.sees(home_of(parent.path)):
        raise Invalid(f"no location {data.parent_id!r}", field="$.parent_id")
    if parent.kind not in allowed:
        raise Invalid(
            f"a {data.kind} goes in a {' or '.join(allowed)}, not in a {parent.kind}",
            field="$.parent_id",
        )
    return parent


async def _row(session: AsyncSession, location_id: str, principal: Principal) -> LocationRow:
    row = await session.get(LocationRow, location_id)
    missing = f"no location {location_id!r}"
    if row is None:
        raise NotFound(missing)
    scope.visible(principal, home_of(row.path), missing)
    return row


def _fields(row: LocationRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "kind": row.kind,
        "parent_id": row.parent_id,
        "path": row.path,
    }


def _view(row: LocationRow) -> Location:
    return Location(
        id=row.id,
        name=row.name,
        kind=row.kind,  # type: ignore[arg-type]  # a LocationKind: written from LocationCreate
        parent_id=row.parent_id,
        path=row.path,
        created_at=row.created_at,
    )
