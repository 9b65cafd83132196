"""What a principal may see: the homes scope of every domain query, in one place.

An administrator (`homes` None) sees everything; anyone else sees the objects of its homes:
a device whose location is in one of them (a device without a location is in no home), a
location under one of them, a rule, a subscription or an audit row that names one of them
(an audit row also when its device is in one). An object outside answers 404 with the words
a missing one gets (`visible`), never 403: nobody learns what another home holds. A device
moved from another home brings along nothing it recorded there (`since_home`; over many
devices `in_home_since`: the audit log, a home's rule's dry run; of its runtime state,
`state_since_home`).

The services call these on every list, read, write, command, history, statistics, audit
query, rule run and dry run; the live messages go through `libs.homes` the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import msgspec
from litestar.datastructures import State
from nats.aio.client import Client as NATS
from sqlalchemy import ColumnElement, Select, exists, false, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import messages as m
from libs.db.engine import at_or_under
from libs.db.models import AuditEntry
from libs.db.models import Device as DeviceRow
from libs.errors import Invalid, NotFound
from libs.homes import Audience, HomeIndex
from libs.principals import Principal, home_of
from services.gateway.resources import Resources

S = TypeVar("S", bound=Select[Any])
HOME_INDEX = "home_index"


def visible(principal: Principal, home: str | None, missing: str) -> None:
    """Raise NotFound(`missing`), the words of an object that does not exist, unless the
    principal sees objects of `home`."""
    if not principal.sees(home):
        raise NotFound(missing)


def under_homes(principal: Principal, path: Any) -> ColumnElement[bool] | None:
    """A location path column (a device's location, a location's path) in the principal's
    homes; None: no condition (an administrator)."""
    if principal.homes is None:
        return None
    if not principal.homes:
        return false()
    return or_(*(at_or_under(path, home) for home in sorted(principal.homes)))


def in_homes(principal: Principal, home: Any) -> ColumnElement[bool] | None:
    """A `home` column (rules, subscriptions) naming one of the principal's homes."""
    if principal.homes is None:
        return None
    return home.in_(sorted(principal.homes)) if principal.homes else false()


def devices(principal: Principal, query: S) -> S:
    """`query` (over `devices`) narrowed to the principal's devices."""
    condition = under_homes(principal, DeviceRow.location)
    return query if condition is None else query.where(condition)


def paths(principal: Principal, query: S, path: Any) -> S:
    """`query` narrowed to the rows whose location `path` is in the principal's homes."""
    condition = under_homes(principal, path)
    return query if condition is None else query.where(condition)


def homed(principal: Principal, query: S, home: Any) -> S:
    """`query` narrowed to the rows whose `home` column is one of the principal's homes."""
    condition = in_homes(principal, home)
    return query if condition is None else query.where(condition)


def since_home(principal: Principal, query: S, device: DeviceRow, time: Any) -> S:
    """`query` (over what was recorded about `device`, at its `time` column) narrowed to what
    the principal sees: for anyone else than an administrator, what was recorded since the
    device came to the home it is in, never what it recorded in a home it was in before."""
    if principal.homes is None or device.home_since is None:
        return query
    return query.where(recorded_since(time, device.home_since))


def audit(principal: Principal, query: S) -> S:
    """Audit rows about the principal's homes: filed under one (a rule's, a location's, a
    registry change's home) or about a device in one now, since it came there (as
    `since_home`)."""
    filed = in_homes(principal, AuditEntry.home)
    in_one_now = under_homes(principal, DeviceRow.location)
    if filed is None or in_one_now is None:  # an administrator
        return query
    devices_now = exists().where(
        DeviceRow.id == AuditEntry.device_id, in_one_now, in_home_since(AuditEntry.time)
    )
    return query.where(or_(filed, devices_now))


def recorded_since(time: Any, home_since: Any) -> ColumnElement[bool]:
    """Recorded while the device was in its home: at or after it came there. The hour of a
    move (a statistic's `hour` is its start) holds both homes' readings: it is out."""
    condition: ColumnElement[bool] = time >= home_since
    return condition


def is_recorded_since(at: datetime | None, home_since: datetime | None) -> bool:
    """`recorded_since` for a time in hand (a state's report time, its `last_seen`), or at
    any time when the device's coming is not known (null); an undated one is not (what it
    reported before may have been reported in the home it was in)."""
    return home_since is None or (at is not None and at >= home_since)


def state_since_home(
    principal: Principal, snapshot: m.DeviceSnapshot, device: DeviceRow
) -> m.DeviceSnapshot:
    """The device's runtime state as the principal sees it: the actors keep one state across
    homes, so for anyone else than an administrator, of a device moved since its registration,
    the attributes (and their report times) it reported since it came to its home, and its
    `last_seen` if since then. A device never moved has had no other home: all of its state
    is its home's (a discovered device's hello came just before its registration)."""
    since = device.home_since
    if principal.homes is None or since is None or since <= device.created_at:
        return snapshot
    reported = {name: at for name, at in snapshot.reported.items() if is_recorded_since(at, since)}
    return msgspec.structs.replace(
        snapshot,
        attributes={name: v for name, v in snapshot.attributes.items() if name in reported},
        reported=reported,
        stale=[name for name in snapshot.stale if name in reported],
        last_seen=snapshot.last_seen if is_recorded_since(snapshot.last_seen, since) else None,
    )


def in_home_since(time: Any) -> ColumnElement[bool]:
    """`recorded_since` against the `devices` row of the query (joined or correlated): at
    or after the device came to its home, or at any time when that is not known (null)."""
    return or_(DeviceRow.home_since.is_(None), recorded_since(time, DeviceRow.home_since))


async def own_devices(
    principal: Principal, sessions: async_sessionmaker[AsyncSession], device_ids: Iterable[str]
) -> None:
    """404 for the first of these devices the principal does not see, as if it were not
    registered (publishing on a device's behalf)."""
    if principal.homes is None:
        return
    wanted = list(dict.fromkeys(device_ids))
    async with sessions() as session:
        rows = await session.execute(
            select(DeviceRow.id, DeviceRow.location).where(DeviceRow.id.in_(wanted))
        )
    homes = {device_id: home_of(location) for device_id, location in rows.all()}
    for device_id in wanted:
        visible(principal, homes.get(device_id), f"device {device_id!r} is not registered")


def home_for(principal: Principal, asked: str | None, field: str) -> str | None:
    """The home of a rule or subscription the principal makes: what it asked for (for anyone
    else than an administrator, one of its homes), or its only home when it did not say.
    An administrator's may be of no home (it then reads the whole platform)."""
    if principal.homes is None:
        return asked
    if asked is None:
        if len(principal.homes) == 1:
            (only,) = principal.homes
            return only
        raise Invalid(
            f"name the home it is for (one of {', '.join(sorted(principal.homes)) or 'none'})",
            field=field,
        )
    if asked not in principal.homes:
        raise Invalid(f"{asked!r} is not one of your homes", field=field)
    return asked


def own_location(principal: Principal, location: str | None, field: str) -> None:
    """A device placed by anyone else than an administrator goes in one of its homes (one in
    no home would be out of its sight at once)."""
    if principal.homes is None:
        return
    if location is None:
        raise Invalid("required: a location in one of your homes", field=field)
    if not principal.sees(home_of(location)):
        raise Invalid(f"{location!r} is not in one of your homes", field=field)


# --- live messages -------------------------------------------------------------------------


async def audience(principal: Principal, state: State, resources: Resources) -> Audience | None:
    """Whom a replayed or live message may reach: None for an administrator (everything,
    nothing looked up), else the principal's homes through the gateway's index of homes."""
    if principal.homes is None:
        return None
    return Audience(await home_index(state, resources), principal.homes)


@dataclass(frozen=True)
class _Started:
    nc: NATS
    index: HomeIndex
    task: asyncio.Future[None]


async def home_index(state: State, resources: Resources) -> HomeIndex:
    """The app's index of homes (`libs.homes`), started by the first request that needs it
    with the app's bus connection and database (its subscriptions end with the connection),
    and reloaded in the background when a request finds it stale."""
    started: _Started | None = state.get(HOME_INDEX)
    if started is None or started.nc is not resources.nc or _failed(started.task):
        index = HomeIndex()
        task = asyncio.ensure_future(index.start(resources.nc, resources.sessions))
        started = state[HOME_INDEX] = _Started(resources.nc, index, task)
    await asyncio.shield(started.task)
    started.index.refresh_if_stale()
    return started.index


def _failed(task: asyncio.Future[None]) -> bool:
    return task.done() and (task.cancelled() or task.exception() is not None)
