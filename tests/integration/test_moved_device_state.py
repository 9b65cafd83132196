"""A device moved to another home shows that home's residents none of the runtime state it
reported in the old one: its state starts afresh once the actors applied its `moved` event,
and until then the device view (`GET /devices/{id}`, `GET /devices`) leaves out the
attributes reported before the move, their report times and a `last_seen` from then
(`scope.state_since_home`).

The gateway runs in-process; the actors run as a process and apply the readings from the
bus, as they do in production. The homes and steps are `test_moved_device_privacy`'s.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
from litestar.testing import AsyncTestClient

from libs import messages as m
from libs.db.models import Device as DeviceRow
from libs.principals import Principal, PrincipalKind, Role
from services.gateway import scope
from tests.helpers import eventually
from tests.integration import test_actors, test_moved_device_privacy
from tests.integration.test_moved_device_privacy import (
    API,
    DEVICES,
    Headers,
    Homes,
    move,
    register,
    report,
)

homes = test_moved_device_privacy.homes
actors = test_actors.actors
# (attributes, reported attribute names, whether `last_seen` is shown)
Seen = tuple[dict[str, Any], list[str], bool]


async def switch(client: AsyncTestClient, lamp: str, on: bool) -> None:
    """The lamp says whether it is on (an attribute `report` never sends)."""
    event = msgspec.to_builtins(m.make_event(lamp, "state", {"on": on}))
    published = await client.post(f"{API}/events", json=event)
    assert published.status_code == 202, published.text


async def viewed(client: AsyncTestClient, lamp: str, headers: Headers | None = None) -> Any:
    answer = await client.get(f"{DEVICES}/{lamp}", headers=headers)
    assert answer.status_code == 200, answer.text
    return answer.json()


async def listed(client: AsyncTestClient, lamp: str, headers: Headers) -> Any:
    """The lamp as the device list shows it to `headers`' principal (None: not listed)."""
    answer = await client.get(DEVICES, params={"limit": 500}, headers=headers)
    assert answer.status_code == 200, answer.text
    return next((item for item in answer.json()["items"] if item["id"] == lamp), None)


async def applied(client: AsyncTestClient, lamp: str, attributes: dict[str, Any]) -> Any:
    """The lamp as an administrator sees it once the actors applied `attributes`."""

    async def check() -> Any:
        device = await viewed(client, lamp)
        assert device["attributes"] == attributes, device["attributes"]
        return device

    return await eventually(check, timeout=15)


def state_of(device: Any) -> Seen:
    return device["attributes"], sorted(device["reports"]), device["last_seen"] is not None


async def test_the_new_homes_resident_sees_none_of_the_state_reported_in_the_old_home(
    client: AsyncTestClient, homes: Homes, actors: Any
) -> None:
    lamp = await register(client, f"{homes.a}/living")
    await switch(client, lamp, True)
    await report(client, lamp, 1.0)
    await applied(client, lamp, {"on": True, "power_w": 1.0})
    in_a = ({"on": True, "power_w": 1.0}, ["on", "power_w"], True)
    assert state_of(await viewed(client, lamp, homes.resident_a)) == in_a

    await move(client, lamp, f"{homes.b}/hall")

    # At once, whether the actors have applied its `moved` event yet or not (the view hides
    # what it reported before the move until then).
    nothing: Seen = ({}, [], False)
    assert state_of(await viewed(client, lamp, homes.resident_b)) == nothing
    assert state_of(await listed(client, lamp, homes.resident_b)) == nothing
    gone = await client.get(f"{DEVICES}/{lamp}", headers=homes.resident_a)
    assert gone.status_code == 404
    assert await listed(client, lamp, homes.resident_a) is None

    await report(client, lamp, 2.0)
    await applied(client, lamp, {"power_w": 2.0})

    in_b = ({"power_w": 2.0}, ["power_w"], True)
    assert state_of(await viewed(client, lamp, homes.resident_b)) == in_b
    assert state_of(await listed(client, lamp, homes.resident_b)) == in_b
    assert state_of(await viewed(client, lamp)) == in_b  # it started afresh in B
    assert await listed(client, lamp, homes.resident_a) is None


def test_an_attribute_counts_from_its_report_at_or_after_the_move() -> None:
    """The boundary as the history's (`recorded_since`): a report at the instant of the move
    is the new home's; an attribute never reported (a rule set it) is not shown; nothing is
    hidden from an administrator, for a device whose coming is not known, or for one never
    moved (its hello may come just before its registration, a rule's setting any time)."""
    moved = datetime(2026, 1, 1, 12, tzinfo=UTC)
    before = datetime(2026, 1, 1, 11, 59, tzinfo=UTC)
    snapshot = m.DeviceSnapshot(
        device_id="lamp",
        attributes={"on": True, "power_w": 2.0, "level": 40},
        reported={"on": before, "power_w": moved},
        stale=["on", "power_w"],
        last_seen=before,
    )
    registered = datetime(2026, 1, 1, 9, tzinfo=UTC)
    device = DeviceRow(id="lamp", created_at=registered, home_since=moved)
    resident = Principal(PrincipalKind.USER, "bea", Role.RESIDENT, frozenset({"b"}))
    admin = Principal(PrincipalKind.USER, "root", Role.ADMIN, None)

    seen = scope.state_since_home(resident, snapshot, device)

    assert (seen.attributes, seen.reported) == ({"power_w": 2.0}, {"power_w": moved})
    assert (seen.stale, seen.last_seen) == (["power_w"], None)
    assert scope.state_since_home(admin, snapshot, device) == snapshot
    unknown = DeviceRow(id="lamp", created_at=registered)
    assert scope.state_since_home(resident, snapshot, unknown) == snapshot
    never_moved = DeviceRow(id="lamp", created_at=moved, home_since=moved)
    assert scope.state_since_home(resident, snapshot, never_moved) == snapshot
