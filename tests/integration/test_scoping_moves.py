"""A device moved from home A to home B, and messages the gateway's index of homes has not
placed yet: the fact that places an object goes to the home it states (live and replayed,
whatever the index holds when it passes), and a replayed message about an object the index
has not heard of is asked of the database, as a live one is.

Homes A and B of `test_scoping`'s world, with a resident of each.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest
from nats.js import JetStreamContext
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import homes, subjects
from libs import messages as m
from libs.principals import Role
from services.gateway import scope
from tests.api import bearer
from tests.helpers import eventually, unique_id
from tests.integration import test_scoping
from tests.integration.test_gateway_sse import following
from tests.integration.test_scoping import DEVICES, EVENTS, READ_TIMEOUT_S, World, telemetry

world = test_scoping.world


@pytest.fixture(scope="module")
async def resident_b(world: World, make_token: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A resident of home B."""
    token = await make_token(Role.RESIDENT, [world.home_b])
    async with httpx.AsyncClient(
        base_url=world.resident.base_url, timeout=10, headers=bearer(token)
    ) as client:
        yield client


async def new_lamp(world: World, home: str) -> str:
    lamp = {"id": unique_id("lamp"), "name": "Lamp", "kind": "light", "location": home}
    created = await world.admin.post(DEVICES, json=lamp)
    assert created.status_code == 201, created.text
    return str(lamp["id"])


async def move(world: World, lamp: str, home: str) -> None:
    moved = await world.admin.patch(f"{DEVICES}/{lamp}", json={"location": home})
    assert moved.status_code == 200, moved.text


async def gateway_index(world: World, resident: httpx.AsyncClient) -> homes.HomeIndex:
    """The gateway's index of homes (started by a resident's request), freshly read: no
    reload starts while a test holds it deaf."""
    answer = await resident.get(EVENTS, params={"subject": "system.location.none", "limit": 1})
    assert answer.status_code == 200, answer.text
    index: homes.HomeIndex = world.app.state[scope.HOME_INDEX].index
    await eventually(lambda: time.monotonic() - index.loaded_at < homes.RELOAD_EVERY_S)
    return index


async def replayed(
    client: httpx.AsyncClient, subject: str, after_seq: int
) -> list[tuple[str, Any]]:
    """(subject, body) of every stored message of `subject` after `after_seq` the client
    may see, page after page."""
    seen: list[tuple[str, Any]] = []
    params: dict[str, Any] = {"subject": subject, "since_seq": after_seq, "limit": 2}
    while True:
        answer = await client.get(EVENTS, params=params)
        assert answer.status_code == 200, answer.text
        page = answer.json()
        seen += [(item["subject"], item["event"]) for item in page["items"]]
        if not page["next_cursor"]:
            return seen
        params = {"subject": subject, "cursor": page["next_cursor"], "limit": 2}


async def test_a_moved_devices_fact_reaches_its_new_home_and_not_its_old_one_live(
    world: World,
    resident_b: httpx.AsyncClient,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    """The index learns the move from its own subscription, which may come after the feeds
    have the fact: here it never hears of it (deaf), still placing the lamp in home A."""
    lamp = await new_lamp(world, world.home_a)
    async with (
        following(world.resident, {"subject": "system.>"}) as in_a,
        following(resident_b, {"subject": "system.>"}) as in_b,
    ):
        index = await gateway_index(world, world.resident)
        await eventually(lambda: index.home(f"events.{lamp}.telemetry") == world.home_a)
        await index.stop()
        try:
            await move(world, lamp, world.home_b)
            # After the move's fact, one that each home sees: the first either gets.
            for each in (world.lamp_a, world.lamp_b):
                assert (await world.admin.post(f"{DEVICES}/{each}/disconnect")).is_success
            async with asyncio.timeout(READ_TIMEOUT_S):
                first_in_a = (await in_a.next_event()).event
                first_in_b = (await in_b.next_event()).event
            assert index.home(f"events.{lamp}.telemetry") == world.home_a  # never told
        finally:
            assert index.nc is not None
            await index.start(index.nc, sessions)
            for each in (world.lamp_a, world.lamp_b):
                await world.admin.post(f"{DEVICES}/{each}/connect")

    assert first_in_a == subjects.device_registry(world.lamp_a)
    assert first_in_b == subjects.device_registry(lamp)


async def test_a_replayed_placing_fact_goes_to_the_home_it_states_not_the_current_one(
    world: World, resident_b: httpx.AsyncClient, js: JetStreamContext
) -> None:
    """The fact that put the lamp in A is A's, even after the lamp moved to B; the move's
    is B's only (it tells where in B the lamp is now)."""
    index = await gateway_index(world, world.resident)
    start = (await js.stream_info(subjects.SYSTEM_STREAM)).state.last_seq
    lamp = await new_lamp(world, world.home_a)
    await move(world, lamp, world.home_b)
    await eventually(lambda: index.home(f"events.{lamp}.telemetry") == world.home_b)

    filter_ = subjects.device_registry(lamp)
    seen_by_a = [body["change"] for _, body in await replayed(world.resident, filter_, start)]
    seen_by_b = [body["change"] for _, body in await replayed(resident_b, filter_, start)]
    seen_by_admin = [body["change"] for _, body in await replayed(world.admin, filter_, start)]

    assert seen_by_admin == ["created", "updated"]
    assert seen_by_a == ["created"]
    assert seen_by_b == ["updated"]


async def test_a_residents_replay_asks_the_database_for_an_object_the_index_has_not_heard_of(
    world: World,
    resident_b: httpx.AsyncClient,
    js: JetStreamContext,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    """New lamps and their readings while the index hears nothing: each home's resident
    still replays its own lamp's reading (the database tells), and not the other's."""
    index = await gateway_index(world, world.resident)
    await index.stop()
    try:
        start = (await js.stream_info(subjects.EVENTS_STREAM)).state.last_seq
        lamp_b = await new_lamp(world, world.home_b)
        lamp_a = await new_lamp(world, world.home_a)
        for lamp in (lamp_b, lamp_a):
            assert (await world.admin.post(EVENTS, json=telemetry(lamp))).status_code == 202
        assert not index.knows(f"events.{lamp_a}.telemetry")

        seen_by_a = [s for s, _ in await replayed(world.resident, "events.>", start)]
        seen_by_b = [s for s, _ in await replayed(resident_b, "events.>", start)]
    finally:
        assert index.nc is not None
        await index.start(index.nc, sessions)

    assert seen_by_a == [f"events.{lamp_a}.telemetry"]
    assert seen_by_b == [f"events.{lamp_b}.telemetry"]


async def test_a_feed_resumed_from_before_a_move_brings_the_new_home_nothing_of_the_old(
    world: World, resident_b: httpx.AsyncClient, js: JetStreamContext
) -> None:
    """A live feed resumed from an old sequence reads the stream back with a consumer of its
    own: the lamp's reading from its time in A is not B's; its reading since the move is."""
    start = (await js.stream_info(subjects.EVENTS_STREAM)).state.last_seq
    lamp = await new_lamp(world, world.home_a)
    index = await gateway_index(world, world.resident)
    await reading(world, lamp, 1.0)
    await move(world, lamp, world.home_b)
    await eventually(lambda: index.home(f"events.{lamp}.telemetry") == world.home_b)
    await reading(world, lamp, 2.0)

    params = {"subject": f"events.{lamp}.telemetry", "since_seq": str(start)}
    async with following(resident_b, params) as in_b, following(world.admin, params) as all_:
        async with asyncio.timeout(READ_TIMEOUT_S):
            first_in_b = (await in_b.next_event()).json["data"]
            seen_by_admin = [(await all_.next_event()).json["data"] for _ in range(2)]

    assert seen_by_admin == [{"power_w": 1.0}, {"power_w": 2.0}]
    assert first_in_b == {"power_w": 2.0}


async def reading(world: World, lamp: str, power_w: float) -> None:
    event = msgspec.to_builtins(m.make_event(lamp, "telemetry", {"power_w": power_w}))
    published = await world.admin.post(EVENTS, json=event)
    assert published.status_code == 202, published.text
