"""A device moved to another home shows that home's residents nothing it recorded in the old
one: its history, hourly statistics, commands and audit rows from before the move are out of
their sight (`scope.since_home`); an administrator still sees all of it, and a move within
one home hides nothing.

The gateway runs in-process; the recorder runs as a process and writes the history, the
commands and the audit log from the bus, as it does in production.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest
from alembic import command
from litestar.testing import AsyncTestClient
from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from libs import messages as m
from libs.db.engine import make_engine
from libs.db.migrate import alembic_config, upgrade
from libs.db.models import Device as DeviceRow
from libs.db.models import HourlyStatistic
from libs.principals import Role
from libs.settings import async_database_url
from tests.api import bearer
from tests.helpers import eventually, unique_id
from tests.processes import Service

API = "/api/v1"
DEVICES = f"{API}/devices"
Headers = dict[str, str]
T = TypeVar("T")
RECORDED_S = 20.0  # the recorder's batches, on a busy machine


@dataclass(frozen=True)
class Homes:
    """Homes A and B, and the headers of a resident of each."""

    a: str
    b: str
    resident_a: Headers
    resident_b: Headers


@pytest.fixture(scope="module")
async def homes(make_token: Any) -> Homes:
    a, b = unique_id("home"), unique_id("home")
    resident_a = bearer(await make_token(Role.RESIDENT, [a]))
    resident_b = bearer(await make_token(Role.RESIDENT, [b]))
    return Homes(a, b, resident_a, resident_b)


@pytest.fixture(scope="module")
async def recorder(service_env: dict[str, str], data_dir: Path) -> AsyncIterator[Service]:
    service = Service("services.recorder", service_env, data_dir)
    await asyncio.to_thread(service.start)
    yield service
    await asyncio.to_thread(service.stop)


async def register(client: AsyncTestClient, location: str) -> str:
    lamp = unique_id("lamp")
    body = {"id": lamp, "name": "Lamp", "kind": "light", "location": location}
    created = await client.post(DEVICES, json=body)
    assert created.status_code == 201, created.text
    return lamp


async def move(client: AsyncTestClient, lamp: str, location: str | None) -> None:
    moved = await client.patch(f"{DEVICES}/{lamp}", json={"location": location})
    assert moved.status_code == 200, moved.text


async def report(client: AsyncTestClient, lamp: str, power_w: float) -> None:
    """A reading of the lamp, published on its behalf and recorded by the recorder."""
    event = msgspec.to_builtins(m.make_event(lamp, "telemetry", {"power_w": power_w}))
    published = await client.post(f"{API}/events", json=event)
    assert published.status_code == 202, published.text


async def send(client: AsyncTestClient, lamp: str) -> str:
    sent = await client.post(f"{DEVICES}/{lamp}/commands", json={"action": "turn_on"})
    assert sent.status_code == 202, sent.text
    return str(sent.json()["id"])


async def powers(client: AsyncTestClient, lamp: str, headers: Headers | None = None) -> list[Any]:
    answer = await client.get(f"{DEVICES}/{lamp}/history", headers=headers)
    assert answer.status_code == 200, answer.text
    return [item["data"]["power_w"] for item in answer.json()["items"]]


async def audited(
    client: AsyncTestClient, lamp: str, headers: Headers | None = None
) -> list[tuple[str, str | None]]:
    """(action, command id) of the audit rows about the lamp, oldest first."""
    answer = await client.get(f"{API}/audit", params={"device_id": lamp}, headers=headers)
    assert answer.status_code == 200, answer.text
    return [(i["action"], i["detail"].get("command_id")) for i in answer.json()["items"]]


async def hours(client: AsyncTestClient, lamp: str, headers: Headers | None = None) -> list[str]:
    answer = await client.get(f"{DEVICES}/{lamp}/statistics", headers=headers)
    assert answer.status_code == 200, answer.text
    return [item["hour"] for item in answer.json()["items"]]


async def home_since(sessions: async_sessionmaker[AsyncSession], lamp: str) -> datetime | None:
    async with sessions() as session:
        row = await session.get(DeviceRow, lamp)
    assert row is not None
    return row.home_since


async def roll_up(sessions: async_sessionmaker[AsyncSession], lamp: str, *starts: datetime) -> None:
    """The hours' `power_w` statistics as the recorder's roll-up writes them (an hour after
    the move is over only in an hour: its row is written here)."""
    async with sessions.begin() as session:
        for hour in starts:
            session.add(
                HourlyStatistic(
                    device_id=lamp,
                    hour=hour,
                    attribute="power_w",
                    count=1,
                    mean=1.0,
                    min=1.0,
                    max=1.0,
                    last=1.0,
                    last_time=hour + timedelta(minutes=30),
                )
            )


def iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


async def recorded(check: Callable[[], Awaitable[T]]) -> T:
    """`check`'s first truthy answer, once the recorder has written what it needs."""
    return await eventually(check, timeout=RECORDED_S)


async def at_least(items: Awaitable[list[T]], n: int) -> list[T] | None:
    found = await items
    return found if len(found) >= n else None


# --- a move to another home ------------------------------------------------------------------


async def test_the_new_homes_resident_sees_nothing_the_device_recorded_in_the_old_home(
    client: AsyncTestClient,
    homes: Homes,
    recorder: Service,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    lamp = await register(client, f"{homes.a}/living")
    await report(client, lamp, 1.0)
    command_in_a = await send(client, lamp)
    # Home A's reading, seen by home A's resident while the lamp is there.
    assert await recorded(lambda: powers(client, lamp, homes.resident_a)) == [1.0]

    await move(client, lamp, f"{homes.b}/hall")
    await report(client, lamp, 2.0)
    command_in_b = await send(client, lamp)
    # Created, sent; updated (the move), sent.
    everything = await recorded(lambda: at_least(audited(client, lamp), 4))
    await recorded(lambda: at_least(powers(client, lamp), 2))
    moved_in = await home_since(sessions, lamp)
    assert moved_in is not None
    hour_of_move = moved_in.replace(minute=0, second=0, microsecond=0)
    before, after = hour_of_move - timedelta(hours=1), hour_of_move + timedelta(hours=1)
    await roll_up(sessions, lamp, before, hour_of_move, after)

    b = homes.resident_b
    assert await powers(client, lamp, b) == [2.0]
    assert await powers(client, lamp) == [1.0, 2.0]
    # The hour of the move holds readings of both homes: only whole hours in B are B's.
    assert await hours(client, lamp, b) == [iso(after)]
    assert await hours(client, lamp) == [iso(before), iso(hour_of_move), iso(after)]
    earlier = await client.get(f"{DEVICES}/{lamp}/commands/{command_in_a}", headers=b)
    assert earlier.status_code == 404
    assert earlier.json()["detail"] == f"device {lamp!r} has no command {command_in_a!r}"
    assert (await client.get(f"{DEVICES}/{lamp}/commands/{command_in_b}", headers=b)).is_success
    assert (await client.get(f"{DEVICES}/{lamp}/commands/{command_in_a}")).is_success
    assert await audited(client, lamp, b) == [
        ("device.updated", None),  # the move: filed under B
        ("command.sent", command_in_b),
    ]
    assert everything == [
        ("device.created", None),
        ("command.sent", command_in_a),
        ("device.updated", None),
        ("command.sent", command_in_b),
    ]


async def test_the_audit_log_unfiltered_hides_the_old_homes_rows_from_the_new_one(
    client: AsyncTestClient,
    homes: Homes,
    recorder: Service,
) -> None:
    """Without a device filter too: the rows about the lamp found through its home now."""
    lamp = await register(client, f"{homes.a}/living")
    await send(client, lamp)
    await move(client, lamp, f"{homes.b}/hall")
    in_b = await send(client, lamp)
    await recorded(lambda: at_least(audited(client, lamp), 4))

    answer = await client.get(f"{API}/audit", params={"limit": 500}, headers=homes.resident_b)
    assert answer.status_code == 200, answer.text
    commands = [
        i["detail"]["command_id"]
        for i in answer.json()["items"]
        if i["device_id"] == lamp and i["action"] == "command.sent"
    ]
    assert commands == [in_b]


async def test_a_move_within_one_home_hides_nothing(
    client: AsyncTestClient,
    homes: Homes,
    recorder: Service,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    lamp = await register(client, f"{homes.a}/living")
    registered = await home_since(sessions, lamp)
    await report(client, lamp, 1.0)
    sent = await send(client, lamp)
    await recorded(lambda: at_least(powers(client, lamp), 1))

    await move(client, lamp, f"{homes.a}/kitchen")
    await report(client, lamp, 2.0)
    await recorded(lambda: at_least(powers(client, lamp), 2))

    a = homes.resident_a
    assert await home_since(sessions, lamp) == registered
    assert await powers(client, lamp, a) == [1.0, 2.0]
    assert (await client.get(f"{DEVICES}/{lamp}/commands/{sent}", headers=a)).is_success


async def test_the_home_changes_when_the_device_leaves_its_home_or_enters_one(
    client: AsyncTestClient, homes: Homes, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """Registered: from then on (an id registered again brings nothing of its earlier life);
    out of any home and into one again: from each of these."""
    before = m.now()
    lamp = await register(client, f"{homes.a}/living")
    registered = await home_since(sessions, lamp)
    await move(client, lamp, None)
    left = await home_since(sessions, lamp)
    await move(client, lamp, f"{homes.b}/hall")
    entered = await home_since(sessions, lamp)

    assert registered is not None and left is not None and entered is not None
    assert before <= registered < left < entered


# --- the migration ---------------------------------------------------------------------------


@pytest.fixture
async def blank_url(tmp_path: Path) -> AsyncIterator[str]:
    """A database of its own, empty: the migration test takes it from 0011 up and down."""
    server = os.environ.get("DATABASE_URL")
    if not server:
        yield f"sqlite+aiosqlite:///{tmp_path / 'moves.db'}"
        return
    name = f"smarthome_moves_{uuid.uuid4().hex[:8]}"
    admin = create_async_engine(async_database_url(server), isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{async_database_url(server).rpartition('/')[0]}/{name}"
    finally:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()


async def test_the_migration_adds_home_since_empty_and_goes_down_and_up_again(
    blank_url: str,
) -> None:
    await asyncio.to_thread(upgrade, blank_url, "0011")
    engine = make_engine(blank_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO devices (id, name, kind, location, lifecycle, enabled,"
                    " metadata, created_at, updated_at) VALUES ('lamp', 'Lamp', 'light',"
                    " 'home/living', 'active', :on, '{}', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                ),
                {"on": True},
            )
        await engine.dispose()  # SQLite: no connection of ours holds the table being rebuilt
        await asyncio.to_thread(upgrade, blank_url)
        upgraded = await _devices(engine)
        await engine.dispose()
        await asyncio.to_thread(command.downgrade, alembic_config(blank_url), "0011")
        downgraded = await _devices(engine)
        await engine.dispose()
        await asyncio.to_thread(upgrade, blank_url)
        again = await _devices(engine)
    finally:
        await engine.dispose()

    # The devices there are keep their records in sight: null is "always".
    assert upgraded == ({"lamp": None}, True)
    assert downgraded == ({"lamp": "gone"}, False)
    assert again == upgraded


async def _devices(engine: AsyncEngine) -> tuple[dict[str, Any], bool]:
    """Each device's `home_since` ("gone" without the column), and whether there is one."""
    async with engine.connect() as conn:
        names = await conn.run_sync(
            lambda c: {column["name"] for column in inspect(c).get_columns("devices")}
        )
        has = "home_since" in names
        read = "SELECT id, home_since FROM devices" if has else "SELECT id, 'gone' FROM devices"
        rows = (await conn.execute(text(read))).all()
    return {device_id: value for device_id, value in rows}, has
