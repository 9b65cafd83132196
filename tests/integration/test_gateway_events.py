"""Publishing to the bus and replaying it over HTTP (`/api/v1/events`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from nats.js import JetStreamContext

from libs import messages as m
from libs import replay, subjects
from libs.settings import Settings
from tests.api import api_client
from tests.helpers import eventually, unique_id

EVENTS = "/api/v1/events"


@pytest.fixture(scope="module")
async def client(settings: Settings, admin_token: str) -> AsyncIterator[AsyncTestClient]:
    async with api_client(settings, admin_token) as client:
        yield client


def cloud_event(device_id: str, event_type: str = "telemetry", **data: Any) -> dict[str, Any]:
    return {
        "id": unique_id("ev"),
        "source": f"device/{device_id}",
        "type": event_type,
        "subject": device_id,
        "specversion": "1.0",
        "data": data,
    }


async def replay_all(client: AsyncTestClient, limit: int, **params: str) -> list[list[int]]:
    """Every page of a replay, as lists of sequences."""
    pages: list[list[int]] = []
    cursor = None
    while True:
        query = {"limit": str(limit), **params} | ({"cursor": cursor} if cursor else {})
        response = await client.get(EVENTS, params=query)
        assert response.status_code == 200, response.text
        page = response.json()
        pages.append([item["seq"] for item in page["items"]])
        cursor = page["next_cursor"]
        if cursor is None:
            return pages


async def test_a_published_event_answers_its_stream_sequence(client: AsyncTestClient) -> None:
    event = cloud_event(unique_id(), power_w=60.0)

    response = await client.post(EVENTS, json=event)

    assert response.status_code == 202
    result = response.json()
    assert (result["id"], result["stream"], result["duplicate"]) == (event["id"], "EVENTS", False)
    assert result["seq"] > 0


async def test_a_repeated_event_id_is_a_duplicate_and_stored_once(
    client: AsyncTestClient,
) -> None:
    device_id = unique_id()
    event = cloud_event(device_id, power_w=1.0)

    first = (await client.post(EVENTS, json=event)).json()
    again = (await client.post(EVENTS, json=event)).json()

    assert again == first | {"duplicate": True}
    stored = await client.get(EVENTS, params={"subject": f"events.{device_id}.>"})
    assert [item["seq"] for item in stored.json()["items"]] == [first["seq"]]


async def test_a_batch_answers_one_result_per_event_in_order(client: AsyncTestClient) -> None:
    device_id = unique_id()
    events = [cloud_event(device_id, power_w=float(i)) for i in range(3)]

    response = await client.post(EVENTS, json=[*events, events[0]])

    assert response.status_code == 202
    results = response.json()["results"]
    assert [r["id"] for r in results] == [e["id"] for e in [*events, events[0]]]
    assert [r["duplicate"] for r in results] == [False, False, False, True]
    seqs = [r["seq"] for r in results]
    assert seqs[:3] == sorted(seqs[:3]) and seqs[3] == seqs[0]


async def test_a_batch_over_500_events_is_refused(client: AsyncTestClient) -> None:
    device_id = unique_id()
    events = [cloud_event(device_id) for _ in range(501)]

    response = await client.post(EVENTS, json=events)

    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "$"
    assert "500" in response.json()["errors"][0]["message"]
    stored = await client.get(EVENTS, params={"subject": f"events.{device_id}.>"})
    assert stored.json()["items"] == []


async def test_an_invalid_event_names_the_field(client: AsyncTestClient) -> None:
    bad_type = cloud_event(unique_id()) | {"type": "has.dots"}
    in_batch = [cloud_event(unique_id()), cloud_event(unique_id()) | {"specversion": "0.3"}]

    naive = cloud_event(unique_id()) | {"time": "2026-01-01T10:00:00"}

    first = await client.post(EVENTS, json=bad_type)
    second = await client.post(EVENTS, json=in_batch)
    third = await client.post(EVENTS, json=naive)

    assert first.status_code == second.status_code == third.status_code == 422
    assert first.json()["errors"][0]["field"] == "$.type"
    assert second.json()["errors"][0]["field"] == "$[1].specversion"
    assert third.json()["errors"][0]["field"] == "$.time"
    assert "timezone" in third.json()["detail"]


async def test_replay_returns_every_event_once_in_order_across_pages(
    client: AsyncTestClient,
) -> None:
    device_id = unique_id()
    published = [
        (await client.post(EVENTS, json=cloud_event(device_id, power_w=float(i)))).json()["seq"]
        for i in range(7)
    ]

    pages = await replay_all(client, limit=3, subject=f"events.{device_id}.>")

    assert pages == [published[0:3], published[3:6], published[6:7]]


async def test_replay_carries_subject_time_and_the_event(client: AsyncTestClient) -> None:
    device_id = unique_id()
    event = cloud_event(device_id, "state", on=True)
    await client.post(EVENTS, json=event, headers={"X-Correlation-Id": "corr-1"})

    [item] = (await client.get(EVENTS, params={"subject": f"events.{device_id}.state"})).json()[
        "items"
    ]

    assert item["subject"] == f"events.{device_id}.state"
    assert item["time"].endswith("Z")
    # The request's correlation id travels with an event that had none.
    assert item["event"] == event | {"correlationid": "corr-1"}


async def test_replay_after_a_sequence_or_from_a_time(client: AsyncTestClient) -> None:
    device_id = unique_id()
    subject = f"events.{device_id}.>"
    seqs = [
        (await client.post(EVENTS, json=cloud_event(device_id))).json()["seq"] for _ in range(3)
    ]
    middle = (await client.get(EVENTS, params={"subject": subject})).json()["items"][1]

    after = await replay_all(client, limit=100, subject=subject, since_seq=str(seqs[0]))
    since = await replay_all(client, limit=100, subject=subject, since=middle["time"])
    at_end = await replay_all(client, limit=100, subject=subject, since_seq=str(seqs[2]))

    assert after == [seqs[1:]]
    assert since == [seqs[1:]]
    assert at_end == [[]]


async def test_replay_refuses_a_sequence_beyond_the_stream(client: AsyncTestClient) -> None:
    response = await client.get(EVENTS, params={"since_seq": str(10**12)})

    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "since_seq"


@pytest.mark.parametrize("subject", ["foo.>", ">", "events", "events..x", "events.a b", "*.x"])
async def test_replay_refuses_a_subject_outside_the_streams(
    client: AsyncTestClient, subject: str
) -> None:
    response = await client.get(EVENTS, params={"subject": subject})

    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "subject"


async def test_replay_of_platform_facts(client: AsyncTestClient) -> None:
    device_id = unique_id()
    await client.post("/api/v1/devices", json={"id": device_id, "name": "x", "kind": "light"})

    async def stored() -> list[dict[str, Any]] | None:
        params = {"subject": f"system.device.{device_id}.*"}
        items: list[dict[str, Any]] = (await client.get(EVENTS, params=params)).json()["items"]
        return items or None

    # The registry fact is relayed from the gateway's outbox after the commit: under the
    # suite's load it may not be stored yet when the POST returns.
    [item] = await eventually(stored)
    fact = m.registry_fact_decoder.decode(m.encoder.encode(item["event"]))
    assert (fact.device_id, fact.change) == (device_id, "created")


async def test_a_bounded_read_passes_over_what_it_does_not_keep_and_leaves_no_consumer(
    client: AsyncTestClient, js: JetStreamContext
) -> None:
    device_id = unique_id()
    published = [
        (await client.post(EVENTS, json=cloud_event(device_id, event_type=t))).json()["seq"]
        for t in ("telemetry", "state", "telemetry", "state", "telemetry")
    ]
    before = {c.name for c in await js.consumers_info(subjects.EVENTS_STREAM)}

    page = await replay.read(
        js,
        subjects.EVENTS_STREAM,
        f"events.{device_id}.>",
        limit=2,
        keep=lambda subject: subject.endswith(".telemetry"),
    )
    rest = await replay.read(
        js, subjects.EVENTS_STREAM, f"events.{device_id}.>", limit=10, after_seq=page.last_seen
    )
    after = {c.name for c in await js.consumers_info(subjects.EVENTS_STREAM)}

    assert [s.seq for s in page.messages] == [published[0], published[2]]
    assert page.last_seen == published[2] and page.more
    assert [s.seq for s in rest.messages] == published[3:] and not rest.more
    assert not {name for name in after - before if name.startswith("replay-")}
