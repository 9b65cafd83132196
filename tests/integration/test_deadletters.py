"""Dead letters you can act on: listed with why they were given up, sent back once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from nats.js import JetStreamContext
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import bus, subjects
from libs import messages as m
from libs.db.models import DeviceState
from libs.principals import Role
from libs.settings import Settings
from services.gateway.pagination import encode_cursor
from services.recorder import rows
from tests.api import api_client
from tests.factories import add_devices
from tests.helpers import eventually, unique_id
from tests.processes import Service

DEADLETTERS = "/api/v1/deadletters"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture(scope="module")
def actors(service_env: dict[str, str], data_dir: Path) -> Iterator[Service]:
    service = Service("services.actors", service_env, data_dir).start()
    yield service
    assert service.stop() == 0, service.tail()


async def letters(client: AsyncTestClient, **params: str) -> list[dict[str, Any]]:
    """Every dead letter the filter finds, following the cursor."""
    found: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        response = await client.get(
            DEADLETTERS, params=params | ({"cursor": cursor} if cursor else {})
        )
        assert response.status_code == 200, response.text
        page = response.json()
        found += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return found


async def power_of(sessions: async_sessionmaker[AsyncSession], device_id: str) -> Any:
    async with sessions() as session:
        state = await session.scalar(select(DeviceState).where(DeviceState.device_id == device_id))
    return state.attributes.get("power_w") if state else None


async def test_a_malformed_event_the_actors_gave_up_on_is_listed_with_its_reason(
    actors: Service,
    client: AsyncTestClient,
    js: JetStreamContext,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    [device] = await add_devices(sessions)
    subject = subjects.device_events(device, "telemetry")
    broken = b'{"id": "x", "broken json'
    stored = await js.publish(subject, broken)

    found = await eventually(lambda: letters(client, subject=subject))

    [letter] = found
    assert letter["original_subject"] == subject
    assert letter["subject"] == subjects.deadletter(subject)
    assert "invalid event" in letter["reason"]
    assert letter["consumer"].startswith("actors")
    assert (letter["original_stream"], letter["original_seq"]) == ("EVENTS", stored.seq)
    assert (letter["preview"], letter["size"], letter["truncated"]) == (
        broken.decode(),
        len(broken),
        False,
    )
    by_consumer = await letters(client, subject="events.*.telemetry", consumer=letter["consumer"])
    assert letter["seq"] in [d["seq"] for d in by_consumer]
    assert await letters(client, subject=subject, consumer="nobody") == []


async def test_a_redriven_dead_letter_is_applied_once_and_audited(
    actors: Service,
    client: AsyncTestClient,
    js: JetStreamContext,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    [device] = await add_devices(sessions)
    event = m.make_event(device, "telemetry", {"power_w": 42.0})
    subject = event.nats_subject
    # A good event the actors gave up on while something was wrong (as `bus.dead_letter` does).
    await bus.dead_letter_stored(
        js,
        subject,
        m.encode(event),
        ("EVENTS", 10**9),
        "database was down",
        "actors-0",
        TRACEPARENT,
    )
    [letter] = await letters(client, subject=subject)

    response = await client.post(f"{DEADLETTERS}/{letter['seq']}/redrive")

    assert response.status_code == 200, response.text
    redriven = response.json()
    assert (redriven["seq"], redriven["subject"], redriven["stream"]) == (
        letter["seq"],
        subject,
        "EVENTS",
    )
    assert await eventually(lambda: power_of(sessions, device)) == 42.0
    copy = await js.get_msg("EVENTS", redriven["new_seq"])
    assert (subjects.published(copy.subject), copy.data) == (subject, m.encode(event))
    assert copy.headers is not None and copy.headers[bus.TRACEPARENT] == TRACEPARENT
    assert not {bus.DL_REASON, bus.DL_CONSUMER, bus.DL_STREAM, bus.DL_STREAM_SEQ} & set(
        copy.headers
    )
    assert await letters(client, subject=subject) == []
    again = await client.post(f"{DEADLETTERS}/{letter['seq']}/redrive")
    assert again.status_code == 404, again.text
    assert again.headers["content-type"] == "application/problem+json"
    # The audit: a fact on the bus, which the recorder turns into a row naming who did it.
    fact_msg = await js.get_last_msg("SYSTEM", subjects.deadletter_changed(letter["seq"]))
    fact = m.change_fact_decoder.decode(fact_msg.data)
    assert (fact.what, fact.change) == ("deadletter", "redriven")
    assert fact.actor.startswith("apikey:")  # the tests' administrator key
    assert fact.detail["new_seq"] == redriven["new_seq"]
    assert fact.detail["reason"] == "database was down"
    audit = rows.Rows()
    rows.from_system(audit, fact_msg.subject or "", fact_msg.data or b"", ("SYSTEM", 1))
    [row] = audit.audit
    assert (row["action"], row["actor"], row["result"]) == ("deadletter.redriven", fact.actor, "ok")


async def test_redriving_what_is_not_a_dead_letter_is_404(client: AsyncTestClient) -> None:
    response = await client.post(f"{DEADLETTERS}/{10**12}/redrive")
    assert response.status_code == 404, response.text
    assert str(10**12) in response.json()["detail"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"subject": "events..x"}, "subject"),
        ({"subject": "events.>.x"}, "subject"),
        ({"consumer": "a.b"}, "consumer"),
        ({"cursor": "not-ours"}, "cursor"),
        ({"cursor": encode_cursor(-1)}, "cursor"),
        ({"reason": "x"}, "reason"),
        ({"limit": "0"}, "limit"),
    ],
)
async def test_a_bad_filter_is_422_naming_it(
    client: AsyncTestClient, params: dict[str, str], field: str
) -> None:
    response = await client.get(DEADLETTERS, params=params)
    assert response.status_code == 422, response.text
    assert field in [e["field"] for e in response.json()["errors"]], response.json()


async def test_a_resident_may_neither_list_nor_redrive(settings: Settings, make_token: Any) -> None:
    token = await make_token(Role.RESIDENT, [unique_id("home")])
    async with api_client(settings, token) as resident:
        listing = await resident.get(DEADLETTERS)
        redrive = await resident.post(f"{DEADLETTERS}/1/redrive")
    assert (listing.status_code, redrive.status_code) == (403, 403)
