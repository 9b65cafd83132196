"""The webhooks of a home and its index of homes: a device moved from home A to home B, and a
message about an object the index has not heard of while the database does not answer.

The fact that places an object goes to the home it states, whatever the worker's index holds
when it passes (it learns the move from its own subscription, which may come later); a
message the index cannot place waits for the database rather than being dropped.

Homes A and B of `test_scoping`'s world; each home's subscription is delivered in-process by
`SubscriptionDelivery` (what the webhooks service runs per subscription) with an index the
test holds deaf, to receivers on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import cast

import pytest
from nats.aio.client import Client as NATS
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import homes, subjects, webhooks
from services.webhooks.dispatcher import SubscriptionDelivery
from services.webhooks.payload import SUBJECT_HEADER
from services.webhooks.store import DeliveryStore
from tests.helpers import eventually, unique_id
from tests.integration import test_scoping
from tests.integration.test_scoping import DEVICES, EVENTS, SUBS, World, telemetry
from tests.integration.webhooks_support import Receiver

world = test_scoping.world

SETTINGS = webhooks.WebhookSettings(allow_nets=webhooks.allow_nets(["127.0.0.0/8"]), timeout_s=5)
DELIVERED_WITHIN_S = 20.0


async def new_lamp(world: World, home: str) -> str:
    lamp = {"id": unique_id("lamp"), "name": "Lamp", "kind": "light", "location": home}
    created = await world.admin.post(DEVICES, json=lamp)
    assert created.status_code == 201, created.text
    return str(lamp["id"])


def subjects_of(receiver: Receiver) -> list[str]:
    return [r.headers[SUBJECT_HEADER] for r in receiver.delivered]


@contextlib.asynccontextmanager
async def home_webhook(
    world: World,
    sessions: async_sessionmaker[AsyncSession],
    nc: NATS,
    index: homes.HomeIndex,
    home: str,
    filter_subject: str,
) -> AsyncIterator[Receiver]:
    """A subscription of `home` (made by an administrator through the API: it may reach
    loopback) to a receiver, delivered with `index` until the block ends."""
    async with Receiver() as receiver:
        body = {"filter": filter_subject, "url": receiver.url, "home": home}
        created = await world.admin.post(SUBS, json=body)
        assert created.status_code == 201, created.text
        subscription_id = created.json()["id"]
        target = (await DeliveryStore(sessions).targets())[subscription_id]
        delivery = SubscriptionDelivery(
            target, nc, DeliveryStore(sessions), SETTINGS, random.Random(), index
        )
        stop = asyncio.Event()
        running = asyncio.create_task(delivery.run(stop))
        try:
            yield receiver
        finally:
            stop.set()
            await running
            await world.admin.delete(f"{SUBS}/{subscription_id}")


@pytest.fixture
async def deaf_index(
    nc: NATS, sessions: async_sessionmaker[AsyncSession]
) -> AsyncIterator[homes.HomeIndex]:
    """An index read from the database that then hears no fact (as one whose subscription
    has not brought a fact yet)."""
    index = homes.HomeIndex()
    await index.start(nc, sessions)
    await index.stop()
    yield index


async def test_a_moved_devices_fact_goes_to_its_new_homes_webhook_not_its_old_ones(
    world: World,
    sessions: async_sessionmaker[AsyncSession],
    nc: NATS,
    deaf_index: homes.HomeIndex,
) -> None:
    """The worker's index never hears of the move (deaf), still placing the lamp in A."""
    lamp = await new_lamp(world, world.home_a)
    deaf_index.set(homes.DEVICE, lamp, world.home_a)  # as learnt from its creation's fact
    registry = subjects.device_registry("*")
    last_a, last_b = (subjects.device_registry(d) for d in (world.lamp_a, world.lamp_b))
    try:
        async with (
            home_webhook(world, sessions, nc, deaf_index, world.home_a, registry) as in_a,
            home_webhook(world, sessions, nc, deaf_index, world.home_b, registry) as in_b,
        ):
            moved = await world.admin.patch(f"{DEVICES}/{lamp}", json={"location": world.home_b})
            assert moved.status_code == 200, moved.text
            # After the move's fact, one that each home gets: the last either waits for.
            for each in (world.lamp_a, world.lamp_b):
                assert (await world.admin.post(f"{DEVICES}/{each}/disconnect")).is_success
            await eventually(lambda: last_a in subjects_of(in_a), DELIVERED_WITHIN_S)
            await eventually(lambda: last_b in subjects_of(in_b), DELIVERED_WITHIN_S)
    finally:
        for each in (world.lamp_a, world.lamp_b):
            await world.admin.post(f"{DEVICES}/{each}/connect")

    assert deaf_index.home(f"events.{lamp}.telemetry") == world.home_a  # never told
    assert subjects_of(in_a) == [last_a]
    assert subjects_of(in_b) == [subjects.device_registry(lamp), last_b]


def failing_first(
    sessions: async_sessionmaker[AsyncSession], failures: int
) -> tuple[async_sessionmaker[AsyncSession], Callable[[], int]]:
    """`sessions` whose first `failures` sessions fail as a database that does not answer
    does; and how many sessions were asked for."""
    asked = 0

    def session() -> AsyncSession:
        nonlocal asked
        asked += 1
        if asked <= failures:
            raise OperationalError("SELECT", {}, ConnectionRefusedError("database down"))
        return sessions()

    return cast(async_sessionmaker[AsyncSession], session), lambda: asked


async def test_a_reading_the_index_cannot_place_waits_for_the_database_not_dropped(
    world: World,
    sessions: async_sessionmaker[AsyncSession],
    nc: NATS,
) -> None:
    """A new lamp's reading reaches the worker before its fact reaches the index, and the
    database does not answer at first: the reading is held and sent to its home's webhook
    when the database answers, not dropped (nor sent to the other home's)."""
    down, asked = failing_first(sessions, failures=3)
    index = homes.HomeIndex()  # knows nothing: its first read fails too
    await index.start(nc, down, must_load=False)
    await index.stop()
    readings = "events.*.telemetry"
    async with (
        home_webhook(world, sessions, nc, index, world.home_a, readings) as in_a,
        home_webhook(world, sessions, nc, index, world.home_b, readings) as in_b,
    ):
        lamp = await new_lamp(world, world.home_a)
        for each in (lamp, world.lamp_b):
            assert (await world.admin.post(EVENTS, json=telemetry(each))).status_code == 202
        reading, last_b = (f"events.{d}.telemetry" for d in (lamp, world.lamp_b))
        started = time.monotonic()
        await eventually(lambda: reading in subjects_of(in_a), DELIVERED_WITHIN_S)
        await eventually(lambda: last_b in subjects_of(in_b), DELIVERED_WITHIN_S)
        waited_s = time.monotonic() - started

    assert asked() > 3, f"the database was asked {asked()} time(s) in {waited_s:.1f} s"
    assert subjects_of(in_a) == [reading]
    assert subjects_of(in_b) == [last_b]
