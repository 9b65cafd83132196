"""Following the bus live over Server-Sent Events (`/api/v1/events/stream`).

Litestar's test client collects a whole response before returning it, which an endless stream
never finishes: here the app runs under a real uvicorn server and httpx reads the stream.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import pytest
import uvicorn
from litestar import Litestar
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from libs import bus, embedded_nats, subjects
from libs import messages as m
from libs.settings import Settings
from services.gateway.app import create_app
from services.gateway.events import service as events_service
from services.gateway.events import sse
from services.gateway.events.controllers import SHARED_FEEDS_KEY
from services.gateway.events.service import EventService, FeedClosed, FeedOverflow, SharedFeeds
from services.gateway.resources import Shutdown
from tests.api import bearer
from tests.helpers import eventually, unique_id

STREAM = "/api/v1/events/stream"
READ_TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def app(settings: Settings) -> Litestar:
    return create_app(settings)


@pytest.fixture(scope="module")
async def http(app: Litestar, admin_token: str) -> AsyncIterator[httpx.AsyncClient]:
    port = embedded_nats.free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    await eventually(lambda: server.started)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", timeout=10, headers=bearer(admin_token)
    ) as client:
        yield client
    server.should_exit = True
    await serving


@dataclass
class ServerSentEvent:
    id: str | None = None
    event: str | None = None
    data: list[str] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)

    @property
    def json(self) -> Any:
        return json.loads("\n".join(self.data))


class EventStream:
    """Reads one SSE response frame by frame."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def next(self) -> ServerSentEvent:
        frame = ServerSentEvent()
        async with asyncio.timeout(READ_TIMEOUT_S):
            async for line in self._lines:
                if line == "":
                    return frame
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "":
                    frame.comments.append(value)
                elif name == "data":
                    frame.data.append(value)
                else:
                    setattr(frame, name, value)
        raise AssertionError("the stream ended")

    async def next_event(self) -> ServerSentEvent:
        """The next frame that is an event (heartbeats and other comments skipped)."""
        while True:
            frame = await self.next()
            if frame.event is not None or frame.data:
                return frame


@asynccontextmanager
async def following(
    client: httpx.AsyncClient, params: dict[str, str], headers: dict[str, str] | None = None
) -> AsyncIterator[EventStream]:
    """A stream, once the server says that its subscription is in place."""
    async with client.stream("GET", STREAM, params=params, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        stream = EventStream(response)
        assert (await stream.next()).comments == ["subscribed"]
        yield stream


async def publish(client: httpx.AsyncClient, device_id: str, n: int) -> list[dict[str, Any]]:
    events = [
        msgspec.to_builtins(m.make_event(device_id, "telemetry", {"power_w": float(i)}))
        for i in range(n)
    ]
    response = await client.post("/api/v1/events", json=events)
    assert response.status_code == 202, response.text
    return [e | {"seq": r["seq"]} for e, r in zip(events, response.json()["results"], strict=True)]


async def test_new_events_arrive_with_sequence_subject_and_body(
    http: httpx.AsyncClient,
) -> None:
    device_id = unique_id()
    async with following(http, {"subject": f"events.{device_id}.>"}) as stream:
        published = await publish(http, device_id, 2)

        received = [await stream.next_event() for _ in published]

    assert [(int(e.id), e.event) for e in received] == [  # type: ignore[arg-type]
        (p["seq"], f"events.{device_id}.telemetry") for p in published
    ]
    assert [e.json["id"] for e in received] == [p["id"] for p in published]
    assert received[0].json["data"] == {"power_w": 0.0}


async def test_resuming_with_last_event_id_gets_exactly_the_missed_events(
    http: httpx.AsyncClient,
) -> None:
    device_id = unique_id()
    seen, *missed = await publish(http, device_id, 4)

    async with following(
        http,
        # A reconnecting EventSource repeats its URL: Last-Event-ID is the newer position.
        {"subject": f"events.{device_id}.>", "since_seq": "0"},
        headers={"Last-Event-ID": str(seen["seq"])},
    ) as stream:
        replayed = [await stream.next_event() for _ in missed]
        [live] = await publish(http, device_id, 1)
        after = await stream.next_event()

    assert [int(e.id) for e in replayed] == [p["seq"] for p in missed]  # type: ignore[arg-type]
    assert int(after.id) == live["seq"]  # type: ignore[arg-type]


async def test_a_client_that_goes_away_leaves_no_consumer_behind(
    http: httpx.AsyncClient, js: JetStreamContext
) -> None:
    subject = f"events.{unique_id()}.>"

    async def consumers() -> list[str]:
        return await _consumers(js, subject)

    async with following(http, {"subject": subject}):
        assert len(await consumers()) == 1

    async def gone() -> bool:
        return not await consumers()

    # Unsubscribed at once; the server removes the idle ephemeral consumer a few seconds later.
    await eventually(gone, timeout=20)


async def test_a_stream_with_an_invalid_subject_is_refused(http: httpx.AsyncClient) -> None:
    response = await http.get(STREAM, params={"subject": "nowhere.>"})
    bad_resume = await http.get(STREAM, headers={"Last-Event-ID": "yesterday"})

    assert response.status_code == bad_resume.status_code == 422
    assert response.json()["errors"][0]["field"] == "subject"
    assert bad_resume.json()["errors"][0]["field"] == "Last-Event-ID"


async def test_a_follower_that_falls_behind_is_cut_off_after_what_was_queued(
    nc: NATS, js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events_service, "FEED_CAPACITY", 3)
    device_id = unique_id()
    feed = await EventService(nc, js, Shutdown()).follow(f"events.{device_id}.>", after_seq=None)
    try:
        acks = []
        for i in range(6):
            event = m.make_event(device_id, "telemetry", {"i": i})
            acks.append(await bus.publish(js, event.nats_subject, event))
        await eventually(lambda: feed.overflowed)

        queued = [await feed.next(timeout=1) for _ in range(3)]
        with pytest.raises(FeedOverflow):
            await feed.next(timeout=1)
    finally:
        await feed.close()

    assert [d.seq for d in queued if d] == [a.seq for a in acks[:3]]


async def test_a_stopping_gateway_ends_its_streams(nc: NATS, js: JetStreamContext) -> None:
    shutdown = Shutdown()
    feed = await EventService(nc, js, shutdown).follow(f"events.{unique_id()}.>", after_seq=None)
    try:
        waiting = asyncio.create_task(feed.next(timeout=30))
        await asyncio.sleep(0)  # let it wait

        shutdown.request()

        with pytest.raises(FeedClosed):
            await asyncio.wait_for(waiting, 5)
    finally:
        await feed.close()


async def _consumers(js: JetStreamContext, subject: str) -> list[str]:
    """The consumers following `subject` (filtered on its stored form)."""
    stored = subjects.stored_filter(subject)
    infos = await js.consumers_info(subjects.EVENTS_STREAM)
    return [i.name for i in infos if i.config.filter_subject == stored]


def _shared_feeds(app: Litestar) -> SharedFeeds:
    return app.state[SHARED_FEEDS_KEY]


async def test_clients_of_one_filter_share_one_consumer_and_each_gets_every_event_once(
    app: Litestar, http: httpx.AsyncClient, js: JetStreamContext
) -> None:
    device_id = unique_id()
    subject = f"events.{device_id}.>"
    async with (
        following(http, {"subject": subject}) as first,
        following(http, {"subject": subject}) as second,
    ):
        feeds = _shared_feeds(app)
        started = feeds.consumers_started
        shared = feeds.tail(subject)
        assert shared is not None and len(shared.followers) == 2
        assert len(await _consumers(js, subject)) == 1

        published = await publish(http, device_id, 5)
        got_first = [await first.next_event() for _ in published]
        got_second = [await second.next_event() for _ in published]
        # Nothing more: each event once.
        [extra] = await publish(http, device_id, 1)
        assert int((await first.next_event()).id) == extra["seq"]  # type: ignore[arg-type]
        assert int((await second.next_event()).id) == extra["seq"]  # type: ignore[arg-type]

    want = [p["seq"] for p in published]
    assert [int(e.id) for e in got_first] == want  # type: ignore[arg-type]
    assert [int(e.id) for e in got_second] == want  # type: ignore[arg-type]
    assert [e.json["id"] for e in got_second] == [p["id"] for p in published]
    assert started == feeds.consumers_started  # the second client started none

    # The last one to leave ends the shared consumer.
    await eventually(lambda: feeds.tail(subject) is None)

    async def gone() -> bool:
        return not await _consumers(js, subject)

    await eventually(gone, timeout=20)


async def test_a_resuming_client_gets_the_missed_events_then_live_ones_beside_a_live_one(
    app: Litestar, http: httpx.AsyncClient, js: JetStreamContext
) -> None:
    device_id = unique_id()
    subject = f"events.{device_id}.>"
    async with following(http, {"subject": subject}) as live:
        seen, *missed = await publish(http, device_id, 4)
        live_got = [await live.next_event() for _ in range(4)]

        async with following(
            http, {"subject": subject}, headers={"Last-Event-ID": str(seen["seq"])}
        ) as resuming:
            replayed = [await resuming.next_event() for _ in missed]
            after = await publish(http, device_id, 3)
            resumed_live = [await resuming.next_event() for _ in after]
            live_got += [await live.next_event() for _ in after]
            [last] = await publish(http, device_id, 1)
            assert int((await resuming.next_event()).id) == last["seq"]  # type: ignore[arg-type]
            assert int((await live.next_event()).id) == last["seq"]  # type: ignore[arg-type]

            # The resuming client reads the shared feed now: its own consumer has ended.
            shared = _shared_feeds(app).tail(subject)
            assert shared is not None and len(shared.followers) == 2
            assert not any(f.catching_up for f in shared.followers)

    assert [int(e.id) for e in replayed] == [p["seq"] for p in missed]  # type: ignore[arg-type]
    assert [int(e.id) for e in resumed_live] == [p["seq"] for p in after]  # type: ignore[arg-type]
    assert [int(e.id) for e in live_got] == [  # type: ignore[arg-type]
        p["seq"] for p in [seen, *missed, *after]
    ]
    await eventually(lambda: _shared_feeds(app).tail(subject) is None)

    async def gone() -> bool:
        return not await _consumers(js, subject)

    await eventually(gone, timeout=20)


async def test_a_follower_catching_up_switches_to_the_shared_feed_without_gap_or_repeat(
    nc: NATS, js: JetStreamContext
) -> None:
    device_id = unique_id()
    subject = f"events.{device_id}.>"
    events = EventService(nc, js, Shutdown())
    live = await events.follow(subject, after_seq=None)
    feeds: list[events_service.LiveFeed] = []
    try:
        acks = []
        for i in range(20):
            event = m.make_event(device_id, "telemetry", {"i": i})
            acks.append(await bus.publish(js, event.nats_subject, event))
            if i % 4 == 3:  # resume from several points while the stream moves on
                feeds.append(await events.follow(subject, after_seq=acks[i - 2].seq))
        got = []
        for feed in feeds:
            seqs = []
            while (d := await feed.next(timeout=0.5)) is not None:
                seqs.append(d.seq)
            got.append(seqs)
    finally:
        for feed in [live, *feeds]:
            await feed.close()

    for start, seqs in zip(range(1, 20, 4), got, strict=True):
        assert seqs == [a.seq for a in acks[start + 1 :]]
    assert all(not f.catching_up for f in feeds)


async def test_events_that_arrive_together_go_out_in_one_write_and_resume_exactly(
    http: httpx.AsyncClient,
) -> None:
    device_id = unique_id()
    subject = f"events.{device_id}.>"
    async with following(http, {"subject": subject}) as stream:
        # One batch POST: the events reach the gateway together, and go out coalesced.
        published = await publish(http, device_id, 30)
        first = [await stream.next_event() for _ in range(12)]

    async with following(
        http, {"subject": subject}, headers={"Last-Event-ID": first[-1].id or ""}
    ) as resumed:
        rest = [await resumed.next_event() for _ in range(18)]
        [live] = await publish(http, device_id, 1)
        after = await resumed.next_event()

    got = [int(e.id) for e in [*first, *rest, after]]  # type: ignore[arg-type]
    assert got == [p["seq"] for p in [*published, live]]


async def test_a_batch_taken_from_a_shared_feed_is_every_queued_message_in_order(
    nc: NATS, js: JetStreamContext
) -> None:
    device_id = unique_id()
    feed = await EventService(nc, js, Shutdown()).follow(f"events.{device_id}.>", after_seq=None)
    try:
        pending = []
        for i in range(20):
            event = m.make_event(device_id, "telemetry", {"i": i})
            pending.append(await js.publish_async(event.nats_subject, m.encode(event)))
        acks = await asyncio.gather(*pending)
        taken: list[int] = []
        batches = 0
        while len(taken) < len(acks):
            batch = await feed.take(timeout=5, limit=256)
            assert batch, "no message within the timeout"
            chunk = sse.frames(batch)
            taken += [int(line[4:]) for line in chunk.split(b"\r\n") if line.startswith(b"id: ")]
            batches += 1
    finally:
        await feed.close()

    assert taken == [a.seq for a in acks]
    assert batches < len(acks)  # coalesced: fewer writes than messages


async def test_a_stream_gets_a_heartbeat_after_its_events_once_it_is_quiet(
    http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sse, "HEARTBEAT_S", 0.3)
    device_id = unique_id()
    async with following(http, {"subject": f"events.{device_id}.>"}) as stream:
        assert (await stream.next()).comments == ["heartbeat"]
        [published] = await publish(http, device_id, 1)
        event = await stream.next()
        heartbeats = [await stream.next() for _ in range(2)]

    assert int(event.id) == published["seq"]  # type: ignore[arg-type]
    assert [h.comments for h in heartbeats] == [["heartbeat"], ["heartbeat"]]


async def test_a_stream_answers_with_the_correlation_id_and_is_counted_in_the_metrics(
    http: httpx.AsyncClient,
) -> None:
    params = {"subject": f"events.{unique_id()}.>"}
    headers = {"X-Correlation-Id": "sse-" + unique_id()}
    async with http.stream("GET", STREAM, params=params, headers=headers) as response:
        assert response.headers["x-correlation-id"] == headers["X-Correlation-Id"]
        assert response.headers["cache-control"] == "no-cache"
        assert "content-length" not in response.headers

    async def counted() -> bool:
        metrics = (await http.get("/metrics")).text
        return any(
            "requests_total" in line and 'path="/api/v1/events/stream"' in line
            for line in metrics.splitlines()
        )

    await eventually(counted)
