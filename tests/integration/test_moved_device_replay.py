"""A device moved to another home: that home's residents replay (`GET /api/v1/events`) none of
the events and commands it had in the old one, whether the gateway's index of homes learnt
the move from its fact or read it from the database; an administrator replays all of them,
and a move within one home hides nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import msgspec
import pytest
from litestar.testing import AsyncTestClient
from nats.js import JetStreamContext

from libs import messages as m
from libs import subjects
from libs.homes import HomeIndex
from libs.settings import Settings
from tests.api import api_client
from tests.helpers import eventually
from tests.integration import test_moved_device_privacy
from tests.integration.test_moved_device_privacy import Homes, move, register, report, send

API = "/api/v1"
EVENTS = f"{API}/events"
Headers = dict[str, str]

homes = test_moved_device_privacy.homes  # the two homes and a resident of each


@dataclass(frozen=True)
class Start:
    """The last sequences of the streams before a test's messages."""

    events: int
    commands: int


@pytest.fixture
async def start(js: JetStreamContext) -> Start:
    events = (await js.stream_info(subjects.EVENTS_STREAM)).state.last_seq
    commands = (await js.stream_info(subjects.COMMANDS_STREAM)).state.last_seq
    return Start(events, commands)


async def replayed(
    client: AsyncTestClient, headers: Headers | None, **params: Any
) -> list[dict[str, Any]]:
    """The bodies of every page of a replay."""
    bodies: list[dict[str, Any]] = []
    query: dict[str, Any] = {"limit": 2, **params}
    while True:
        answer = await client.get(EVENTS, params=query, headers=headers)
        assert answer.status_code == 200, answer.text
        page = answer.json()
        bodies += [item["event"] for item in page["items"]]
        if not page["next_cursor"]:
            return bodies
        query = {"limit": 2, "subject": params["subject"], "cursor": page["next_cursor"]}


async def powers(
    client: AsyncTestClient, lamp: str, headers: Headers | None, start: Start
) -> list[float]:
    subject = subjects.device_events(lamp, "telemetry")
    bodies = await replayed(client, headers, subject=subject, since_seq=start.events)
    return [body["data"]["power_w"] for body in bodies]


async def commands(
    client: AsyncTestClient, lamp: str, headers: Headers | None, start: Start
) -> list[str]:
    subject = subjects.commands(lamp)
    bodies = await replayed(client, headers, subject=subject, since_seq=start.commands)
    return [body["id"] for body in bodies]


async def first_seen(replay: Callable[[], Awaitable[list[float]]]) -> list[float]:
    """The first replay that holds something (once the index has the lamp where it is)."""
    return await eventually(replay)


async def test_the_new_homes_resident_replays_nothing_the_device_had_in_the_old_home(
    client: AsyncTestClient, homes: Homes, start: Start
) -> None:
    """The gateway's index of homes is running when the lamp moves: it learns the move, and
    when it began, from the move's fact."""
    registered = m.now()
    lamp = await register(client, f"{homes.a}/living")
    await report(client, lamp, 1.0)
    in_a = await send(client, lamp)
    assert await powers(client, lamp, homes.resident_a, start) == [1.0]  # A's, while there

    await move(client, lamp, f"{homes.b}/hall")
    await report(client, lamp, 2.0)
    in_b = await send(client, lamp)
    # Once the index has the move, B's resident replays the lamp's messages of home B.
    b = homes.resident_b
    seen_by_b = await first_seen(lambda: powers(client, lamp, b, start))

    assert seen_by_b == [2.0]
    assert await commands(client, lamp, b, start) == [in_b]

    async def since_registered() -> list[dict[str, Any]] | None:
        bodies = await replayed(
            client, b, subject=subjects.device_events(lamp, ">"), since=registered.isoformat()
        )
        return bodies if len(bodies) >= 2 else None

    # The `moved` event is relayed from the gateway's outbox after the move's commit: under
    # load it may be stored after the telemetry sent in B. Wait for two, then compare.
    from_a_time = await eventually(since_registered)
    # Its coming to B (the `moved` event) and what it reported there; nothing from A.
    assert [(body["type"], body["data"]) for body in from_a_time] == [
        (m.MOVED, {"home": homes.b}),
        ("telemetry", {"power_w": 2.0}),
    ]
    assert await powers(client, lamp, None, start) == [1.0, 2.0]
    assert await commands(client, lamp, None, start) == [in_a, in_b]
    # The lamp is no longer A's: what it had there is an administrator's to see only.
    assert await powers(client, lamp, homes.resident_a, start) == []


async def test_an_index_read_after_the_move_hides_the_old_homes_messages_too(
    client: AsyncTestClient, homes: Homes, start: Start, settings: Settings, admin_token: str
) -> None:
    """A gateway started after the move reads when the lamp came to B from the database."""
    lamp = await register(client, f"{homes.a}/living")
    await report(client, lamp, 1.0)
    in_a = await send(client, lamp)
    await move(client, lamp, f"{homes.b}/hall")
    await report(client, lamp, 2.0)
    in_b = await send(client, lamp)

    # Another gateway in-process: its index of homes is read from the database now.
    async with api_client(settings, admin_token) as gateway:
        seen_by_b = await powers(gateway, lamp, homes.resident_b, start)
        sent_in_b = await commands(gateway, lamp, homes.resident_b, start)
        everything = await commands(gateway, lamp, None, start)

    assert seen_by_b == [2.0]
    assert sent_in_b == [in_b]
    assert everything == [in_a, in_b]


async def test_a_move_within_one_home_hides_nothing_of_a_replay(
    client: AsyncTestClient, homes: Homes, start: Start
) -> None:
    lamp = await register(client, f"{homes.a}/living")
    await report(client, lamp, 1.0)
    a = homes.resident_a
    assert await first_seen(lambda: powers(client, lamp, a, start)) == [1.0]

    await move(client, lamp, f"{homes.a}/kitchen")
    await report(client, lamp, 2.0)

    assert await powers(client, lamp, a, start) == [1.0, 2.0]


# --- the index alone ---------------------------------------------------------------------------


def placing(lamp: str, change: str, location: str, at: datetime) -> bytes:
    """The registry fact of a change placing the lamp at `location`, as the gateway sends it."""
    entry = m.RegistryEntry(id=lamp, location=location, created_at=at, updated_at=at)
    return m.encode(
        m.RegistryFact(
            device_id=lamp,
            change=m.RegistryChange(change),
            actor="user:alice",
            correlation_id="c",
            time=at,
            device=entry,
        )
    )


def reading(lamp: str, at: datetime | None) -> bytes:
    return m.encode(msgspec.structs.replace(m.make_event(lamp, "telemetry"), time=at))


def test_the_index_dates_a_moved_devices_messages_from_the_move() -> None:
    index = HomeIndex()
    lamp, reg = "lamp", subjects.device_registry("lamp")
    events, command = subjects.device_events(lamp, "telemetry"), subjects.commands(lamp)
    hour = timedelta(hours=1)
    now = m.now()
    in_a, in_b = reading(lamp, now - 3 * hour), reading(lamp, now)
    sent_in_a = m.encode(
        m.Command(
            id="c1",
            device_id=lamp,
            action="turn_on",
            params={},
            issued_at=now - 3 * hour,
            expires_at=now - 3 * hour,
            issued_by="user:alice",
            correlation_id="c",
        )
    )
    undated = reading(lamp, None)

    index.learn(reg, placing(lamp, "created", "home-a/living", now - 4 * hour))
    index.learn(reg, placing(lamp, "updated", "home-a/kitchen", now - 2 * hour))
    within_a = index.home_at_once(events, in_a)  # a move within A hides nothing
    index.learn(reg, placing(lamp, "updated", "home-b/hall", now - hour))

    assert within_a == "home-a"
    assert index.home_at_once(events, in_a) is None  # A's: no home's now (admins only)
    assert index.home_at_once(command, sent_in_a) is None
    assert index.home_at_once(events, in_b) == "home-b"
    # Undated: by when the stream stored it, when the reader has that; else as a live one.
    assert index.before_placement(events, undated, stored=now - 3 * hour)
    assert not index.before_placement(events, undated, stored=now)
    assert index.home_at_once(events, undated) == "home-b"
    # A device registered again brings nothing of its earlier life, in the same home too.
    index.learn(reg, placing(lamp, "created", "home-b/hall", now + hour))
    assert index.home_at_once(events, in_b) is None
