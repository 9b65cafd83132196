"""Following the bus live over a WebSocket (`/api/v1/events/ws`), the per-client cap on live
streams, and the live feed that SSE and WebSocket share.

The app runs under a real uvicorn server; a real WebSocket client (`websockets`) connects.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
import pytest
import uvicorn
from litestar import Litestar
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin

from libs import bus, embedded_nats, subjects
from libs import messages as m
from libs.principals import Role
from libs.settings import Settings
from services.gateway import connections
from services.gateway.app import create_app
from services.gateway.events import service as events_service
from services.gateway.events.service import EventService
from services.gateway.events.websocket import ACK_WINDOW, MAX_SUBSCRIPTIONS, Close, EventSocket
from services.gateway.resources import Shutdown
from tests.api import bearer
from tests.helpers import eventually, unique_id

STREAM = "/api/v1/events/stream"
SOCKET = "/api/v1/events/ws"
READ_TIMEOUT_S = 10.0
CLIENT = "127.0.0.1"


@dataclass
class Gateway:
    app: Litestar
    http: httpx.AsyncClient
    ws_url: str
    token: str

    @property
    def limits(self) -> connections.StreamLimits:
        return connections.provide_stream_limits(self.app.state)


@asynccontextmanager
async def serving(app: Litestar, token: str) -> AsyncIterator[Gateway]:
    port = embedded_nats.free_port()
    config = uvicorn.Config(app, host=CLIENT, port=port, log_config=None, access_log=False)
    server = uvicorn.Server(config)
    running = asyncio.create_task(server.serve())
    await eventually(lambda: server.started)
    try:
        async with httpx.AsyncClient(
            base_url=f"http://{CLIENT}:{port}", timeout=10, headers=bearer(token)
        ) as http:
            yield Gateway(app, http, f"ws://{CLIENT}:{port}{SOCKET}", token)
    finally:
        server.should_exit = True
        await running


@pytest.fixture(scope="module")
async def gateway(settings: Settings, admin_token: str) -> AsyncIterator[Gateway]:
    async with serving(create_app(settings), admin_token) as running:
        yield running


Frame = dict[str, Any]


class Socket:
    """A client of `/events/ws` that reads frames as JSON, pings left out."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def send(self, **message: Any) -> None:
        await self.ws.send(json.dumps(message))

    async def next(self) -> Frame:
        async with asyncio.timeout(READ_TIMEOUT_S):
            while True:
                frame = json.loads(await self.ws.recv())
                if frame["type"] != "ping":
                    return frame

    async def until(self, done: Callable[[Frame], bool]) -> list[Frame]:
        """Every frame up to and including the first one that is `done`."""
        frames = []
        while True:
            frames.append(await self.next())
            if done(frames[-1]):
                return frames

    async def subscribe(self, sub_id: str, subject: str, since_seq: int | None = None) -> None:
        extra = {} if since_seq is None else {"since_seq": since_seq}
        await self.send(type="subscribe", id=sub_id, subject=subject, **extra)
        assert await self.next() == {"type": "subscribed", "id": sub_id, "subject": subject}


@asynccontextmanager
async def socket(gateway: Gateway) -> AsyncIterator[Socket]:
    async with connect(
        gateway.ws_url,
        proxy=None,
        open_timeout=5,
        close_timeout=2,
        additional_headers=bearer(gateway.token),
    ) as ws:
        yield Socket(ws)


def event_on(sub_id: str, seq: int) -> Callable[[Frame], bool]:
    return lambda f: f["type"] == "event" and f["id"] == sub_id and f["seq"] == seq


def seqs(frames: list[Frame], sub_id: str) -> list[int]:
    return [f["seq"] for f in frames if f["type"] == "event" and f["id"] == sub_id]


async def publish(
    http: httpx.AsyncClient, *events: tuple[str, str], batch: int = 500
) -> list[dict[str, Any]]:
    """Publish (device id, event type)s in order; each with its stream `seq`."""
    out = []
    bodies = [msgspec.to_builtins(m.make_event(d, t, {"n": i})) for i, (d, t) in enumerate(events)]
    for start in range(0, len(bodies), batch):
        chunk = bodies[start : start + batch]
        response = await http.post("/api/v1/events", json=chunk)
        assert response.status_code == 202, response.text
        out += [
            e | {"seq": r["seq"]} for e, r in zip(chunk, response.json()["results"], strict=True)
        ]
    return out


async def test_each_subscription_of_a_socket_gets_its_own_events_once(gateway: Gateway) -> None:
    a, b = unique_id(), unique_id()
    async with socket(gateway) as ws:
        await ws.subscribe("all-of-a", f"events.{a}.>")
        await ws.subscribe("telemetry-of-b", f"events.{b}.telemetry")

        a1, b1, _b_state, a2 = await publish(
            gateway.http, (a, "telemetry"), (b, "telemetry"), (b, "state"), (a, "state")
        )
        # Published after the others: once both arrived, everything before them has too.
        a_last, b_last = await publish(gateway.http, (a, "telemetry"), (b, "telemetry"))
        frames = await ws.until(event_on("all-of-a", a_last["seq"]))
        if not any(event_on("telemetry-of-b", b_last["seq"])(f) for f in frames):
            frames += await ws.until(event_on("telemetry-of-b", b_last["seq"]))

    assert seqs(frames, "all-of-a") == [a1["seq"], a2["seq"], a_last["seq"]]
    assert seqs(frames, "telemetry-of-b") == [b1["seq"], b_last["seq"]]
    assert {f["type"] for f in frames} == {"event"}
    first = next(f for f in frames if f["seq"] == a1["seq"])
    assert first["subject"] == f"events.{a}.telemetry"
    assert first["data"]["id"] == a1["id"] and first["data"]["data"] == {"n": 0}


async def test_unsubscribing_stops_delivery_and_leaves_no_consumer_bound(
    gateway: Gateway, js: JetStreamContext
) -> None:
    a, b = unique_id(), unique_id()

    async def consumers_of_a() -> list[bool]:
        """Each consumer on `a`'s filter: whether a subscriber is bound to it."""
        infos = await js.consumers_info(subjects.EVENTS_STREAM)
        stored = subjects.stored_filter(f"events.{a}.>")
        return [bool(i.push_bound) for i in infos if i.config.filter_subject == stored]

    async def a_is_unbound() -> bool:
        return not any(await consumers_of_a())

    async with socket(gateway) as ws:
        await ws.subscribe("a", f"events.{a}.>")
        await ws.subscribe("b", f"events.{b}.>")
        assert await consumers_of_a() == [True]

        await ws.send(type="unsubscribe", id="a")
        assert await ws.next() == {"type": "unsubscribed", "id": "a"}
        _after_a, after_b = await publish(gateway.http, (a, "telemetry"), (b, "telemetry"))
        frames = await ws.until(event_on("b", after_b["seq"]))
        # One more round trip through the socket: anything still under way for `a` is in.
        await ws.send(type="unsubscribe", id="b")
        frames += await ws.until(lambda f: f["type"] == "unsubscribed")

        await eventually(a_is_unbound, timeout=5)

    assert [f for f in frames if f.get("id") == "a"] == []
    assert seqs(frames, "b") == [after_b["seq"]]


async def test_resubscribing_with_since_seq_gets_exactly_the_missed_events_then_live_ones(
    gateway: Gateway,
) -> None:
    device = unique_id()
    subject = f"events.{device}.>"
    async with socket(gateway) as ws:
        await ws.subscribe("s", subject)
        _first, seen = await publish(gateway.http, (device, "telemetry"), (device, "telemetry"))
        await ws.until(event_on("s", seen["seq"]))
        await ws.send(type="ack", id="s", seq=seen["seq"])

    missed = await publish(gateway.http, *[(device, "telemetry")] * 3)

    async with socket(gateway) as ws:
        await ws.subscribe("s", subject, since_seq=seen["seq"])
        replayed = await ws.until(event_on("s", missed[-1]["seq"]))
        [live] = await publish(gateway.http, (device, "telemetry"))
        after = await ws.until(event_on("s", live["seq"]))

    assert seqs(replayed, "s") == [e["seq"] for e in missed]
    assert [f["data"]["id"] for f in replayed] == [e["id"] for e in missed]
    assert seqs(after, "s") == [live["seq"]]


async def test_an_invalid_message_gets_an_error_frame_and_the_socket_stays_usable(
    gateway: Gateway,
) -> None:
    device = unique_id()
    async with socket(gateway) as ws:
        await ws.send(type="subscribe", id="bad", subject="nowhere.>")
        bad_subject = await ws.next()
        await ws.send(type="subscribe", id="no-subject")
        await ws.send(type="subscribe", id="x", subject="events.>", colour="red")
        missing = await ws.next()
        unknown = await ws.next()
        await ws.send(type="dance")
        wrong_type = await ws.next()
        await ws.ws.send("not json")
        not_json = await ws.next()

        await ws.subscribe("good", f"events.{device}.>")
        [event] = await publish(gateway.http, (device, "telemetry"))
        [frame] = await ws.until(event_on("good", event["seq"]))

    assert bad_subject["type"] == "error"
    assert (bad_subject["id"], bad_subject["field"]) == ("bad", "$.subject")
    assert "nowhere.>" in bad_subject["message"]
    assert (missing["id"], missing["field"]) == ("no-subject", "$.subject")
    assert (unknown["id"], unknown["field"]) == ("x", "$.colour")
    assert wrong_type["field"] == "$.type"
    assert (not_json["field"], not_json["id"]) == ("$", None)
    assert frame["data"]["id"] == event["id"]


async def test_a_socket_holds_at_most_20_subscriptions(gateway: Gateway) -> None:
    subject = f"events.{unique_id()}.>"
    async with socket(gateway) as ws:
        for n in range(MAX_SUBSCRIPTIONS):
            await ws.subscribe(f"s{n}", subject)

        await ws.send(type="subscribe", id="one-more", subject=subject)
        refused = await ws.next()
        await ws.send(type="unsubscribe", id="s0")
        assert await ws.next() == {"type": "unsubscribed", "id": "s0"}
        await ws.subscribe("one-more", subject)

    assert refused["type"] == "error" and refused["id"] == "one-more"
    assert f"at most {MAX_SUBSCRIPTIONS} subscriptions" in refused["message"]


async def test_a_client_that_stops_acking_is_closed_with_4008_naming_where_to_resume(
    gateway: Gateway,
) -> None:
    device = unique_id()
    subject = f"events.{device}.>"
    early = await publish(gateway.http, *[(device, "telemetry")] * 10)
    async with socket(gateway) as ws:
        await ws.subscribe("s", subject, since_seq=early[0]["seq"] - 1)
        await ws.until(event_on("s", early[-1]["seq"]))
        await ws.send(type="ack", id="s", seq=early[-1]["seq"])
        # Messages on a socket are handled in order: once this is refused, the ack is in.
        await ws.send(type="ack", id="unknown", seq=1)
        assert (await ws.next())["type"] == "error"

        later = await publish(gateway.http, *[(device, "telemetry")] * (ACK_WINDOW + 1))
        frames: list[Frame] = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                frames.append(await ws.next())

    assert seqs(frames, "s") == [e["seq"] for e in later[:ACK_WINDOW]]
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4008
    assert closed.value.rcvd.reason == (
        f"client too slow; resubscribe with since_seq={early[-1]['seq']}"
    )


async def test_a_principal_gets_no_more_live_streams_than_its_cap(
    settings: Settings, admin_token: str, make_token
) -> None:
    other = bearer(await make_token(Role.ADMIN))
    app = create_app(settings)
    connections.install(app.state, per_client=2)
    params = {"subject": f"events.{unique_id()}.>"}
    async with (
        serving(app, admin_token) as gateway,
        gateway.http.stream("GET", STREAM, params=params) as first,
    ):
        assert first.status_code == 200
        async with socket(gateway) as ws:
            await ws.subscribe("s", params["subject"])

            refused = await gateway.http.get(STREAM, params=params)
            async with socket(gateway) as third_ws:
                with pytest.raises(ConnectionClosed) as closed:
                    await third_ws.next()
            # Another principal from the same address has its own streams.
            async with gateway.http.stream("GET", STREAM, params=params, headers=other) as own:
                assert own.status_code == 200

        # The socket's slot is free again once it has gone.
        owner = (await gateway.http.get("/api/v1/me")).json()["actor"]
        await eventually(lambda: gateway.limits.count(owner) == 1)
        async with gateway.http.stream("GET", STREAM, params=params) as again:
            assert again.status_code == 200

    assert refused.status_code == 429
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert "2 live streams" in refused.json()["detail"]
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1013
    assert "at most 2" in closed.value.rcvd.reason


async def test_a_socket_that_stops_reading_is_closed_once_its_feed_overflows(
    nc: NATS, js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events_service, "FEED_CAPACITY", 3)
    device = unique_id()
    start = await bus.publish(js, *_telemetry(device))
    sent: list[bytes] = []

    async def send(frame: bytes) -> None:
        sent.append(frame)
        if b'"type":"event"' in frame:
            await asyncio.Future()  # the client's buffers are full: the write never ends

    incoming: asyncio.Queue[str | None] = asyncio.Queue()
    subject = f"events.{device}.>"
    subscribe = {"type": "subscribe", "id": "s", "subject": subject, "since_seq": start.seq}
    incoming.put_nowait(json.dumps(subscribe))
    session = EventSocket(EventService(nc, js, Shutdown()), send)
    running = asyncio.create_task(session.run(incoming.get))
    await eventually(lambda: sent)  # subscribed
    for _ in range(10):
        await bus.publish(js, *_telemetry(device))

    close = await asyncio.wait_for(running, 10)

    # Stuck on the first event: the client has what came before it.
    assert close == Close(4008, f"client too slow; resubscribe with since_seq={start.seq}")
    assert len(sent) == 2


async def test_an_idle_socket_gets_a_ping_every_heartbeat(nc: NATS, js: JetStreamContext) -> None:
    sent: list[bytes] = []

    async def send(frame: bytes) -> None:
        sent.append(frame)

    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def receive() -> str | None:
        await never  # a client that says nothing and stays
        return None

    session = EventSocket(EventService(nc, js, Shutdown()), send, heartbeat_s=0.05)
    running = asyncio.create_task(session.run(receive))
    try:
        await eventually(lambda: len(sent) >= 2)
    finally:
        never.set_result(None)
        assert await asyncio.wait_for(running, 5) is None  # the client left: nothing to close

    assert set(sent) == {b'{"type":"ping"}'}


async def test_a_feed_whose_consumer_is_recreated_before_its_first_message_does_not_start_over(
    nc: NATS, js: JetStreamContext
) -> None:
    device = unique_id()
    for _ in range(3):  # history that a feed of new messages must never show
        await bus.publish(js, *_telemetry(device))
    feed = await EventService(nc, js, Shutdown()).follow(f"events.{device}.>", after_seq=None)
    try:
        # What nats-py does after a missed heartbeat or a gap: start again after the last
        # sequence it has seen.
        # New messages only: the filter's shared consumer brings them.
        jsi = feed._tail.subscription._sub._jsi  # type: ignore[union-attr]
        await jsi.reset_ordered_consumer(jsi._sseq + 1)
        new = await bus.publish(js, *_telemetry(device))

        first = await feed.next(timeout=5)
    finally:
        await feed.close()

    assert first is not None and first.seq == new.seq


def _telemetry(device: str) -> tuple[str, bytes]:
    event = m.make_event(device, "telemetry", {"power_w": 1.0})
    return event.nats_subject, m.encode(event)


async def test_an_upgrade_from_a_foreign_origin_is_refused(gateway: Gateway) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(
            gateway.ws_url,
            proxy=None,
            open_timeout=5,
            origin=Origin("https://evil.example"),
            additional_headers=bearer(gateway.token),
        ):
            pass
    assert refused.value.response.status_code == 403
    own = Origin(f"http://{CLIENT}:{gateway.ws_url.split(':')[2].split('/')[0]}")
    async with connect(
        gateway.ws_url,
        proxy=None,
        open_timeout=5,
        origin=own,
        additional_headers=bearer(gateway.token),
    ) as ws:
        socket_ = Socket(ws)
        await socket_.subscribe("s", f"events.{unique_id()}.>")
