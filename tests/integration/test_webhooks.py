"""Webhook subscriptions end to end: the gateway in-process, the webhooks service as a real
process, and a real HTTP receiver in the test that fails, hangs or answers on demand."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from litestar import Litestar, Router
from litestar.testing import AsyncTestClient
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy
from nats.js.errors import NotFoundError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import bus, subjects, webhooks
from libs import messages as m
from libs.errors import Invalid
from libs.principals import Principal, PrincipalKind, Role
from libs.settings import Settings
from services.gateway.app import API_PREFIX, create_app
from services.gateway.auth.context import Context
from services.gateway.subscriptions.controllers import SubscriptionController
from services.gateway.subscriptions.schemas import SubscriptionCreate
from services.gateway.subscriptions.service import SubscriptionService
from services.webhooks import sender as sender_mod
from services.webhooks.payload import Payload
from services.webhooks.sender import Outcome, Sender, make_session
from tests.api import bearer
from tests.helpers import eventually, unique_id
from tests.integration.test_rules import collected
from tests.processes import Service
from tests.proxy import Relay

SUBS = f"{API_PREFIX}/subscriptions"
RESIDENT = Principal(PrincipalKind.USER, "resident", Role.RESIDENT, frozenset({"home-a"}))
# The service and the in-process gateway read the same settings.
WEBHOOK_ENV = {
    "SMARTHOME_WEBHOOK_ALLOW_NETS": "127.0.0.0/8",  # the receivers listen on 127.0.0.1
    "SMARTHOME_WEBHOOK_RETRY_BASE": "0.2",
    "SMARTHOME_WEBHOOK_TIMEOUT": "5",
}


def gateway_app(settings: Settings) -> Litestar:
    """The gateway, with the subscriptions controller until app.py registers it."""
    app = create_app(settings)
    if not any(route.path.startswith(SUBS) for route in app.routes):
        app.register(Router(path=API_PREFIX, route_handlers=[SubscriptionController]))
    return app


def with_webhooks(settings: Settings, allow_nets: tuple[str, ...] = ("127.0.0.0/8",)) -> Settings:
    """What WEBHOOK_ENV says, for the in-process gateway."""
    return dataclasses.replace(
        settings,
        webhook_allow_nets=allow_nets,
        webhook_retry_base_s=0.2,
        webhook_timeout_s=5.0,
    )


@pytest.fixture(scope="module")
async def client(settings: Settings, admin_token: str) -> AsyncIterator[AsyncTestClient]:
    async with AsyncTestClient(gateway_app(with_webhooks(settings))) as client:
        client.headers.update(bearer(admin_token))
        yield client


# --- a webhook receiver ------------------------------------------------------------------------


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    status: int | None  # None: never answered


@dataclass
class Receiver:
    """An HTTP endpoint on 127.0.0.1 that answers 500 to its first `fail_first` requests and
    200 after, or never answers (`hang`)."""

    fail_first: int = 0
    hang: bool = False
    hang_at: int | None = None  # never answers this request (counted from 0)
    requests: list[Received] = field(default_factory=list)
    hanging: int = 0  # requests waiting for an answer that will not come
    _release: asyncio.Event = field(default_factory=asyncio.Event)
    _server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/hook"

    @property
    def delivered(self) -> list[Received]:
        return [r for r in self.requests if r.status == 200]

    async def __aenter__(self) -> Receiver:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_: object) -> None:
        self._release.set()
        assert self._server is not None
        self._server.close()

    def _answer(self) -> int | None:
        if self.hang or len(self.requests) == self.hang_at:
            return None
        return 500 if len(self.requests) < self.fail_first else 200

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # keep-alive: one request after another on this connection
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in head[1:] if line)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                status = self._answer()
                self.requests.append(Received(headers, body, status))
                if status is None:
                    await self._hang(reader)
                    return
                writer.write(f"HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n".encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _hang(self, reader: asyncio.StreamReader) -> None:
        """Until the client gives up (closes) or the test ends."""
        self.hanging += 1
        gave_up = asyncio.ensure_future(reader.read())
        released = asyncio.ensure_future(self._release.wait())
        await asyncio.wait([gave_up, released], return_when=asyncio.FIRST_COMPLETED)
        for waiting in (gave_up, released):
            waiting.cancel()
        self.hanging -= 1


# --- helpers -----------------------------------------------------------------------------------


class Subscriptions:
    """Creates subscriptions through the API and deletes them when the test ends."""

    def __init__(self, client: AsyncTestClient) -> None:
        self.client = client
        self.ids: list[str] = []

    async def create(
        self, receiver: Receiver | Scripted, device_id: str, **body: Any
    ) -> dict[str, Any]:
        filter_subject = subjects.device_events_all(device_id)
        response = await self.client.post(
            SUBS, json={"filter": filter_subject, "url": receiver.url, **body}
        )
        assert response.status_code == 201, response.text
        self.ids.append(response.json()["id"])
        return response.json()

    async def get(self, subscription_id: str) -> dict[str, Any]:
        response = await self.client.get(f"{SUBS}/{subscription_id}")
        assert response.status_code == 200, response.text
        return response.json()

    async def delivered(self, subscription_id: str, count: int) -> bool:
        """The subscription's counter says `count` (it is written about once a second)."""
        return (await self.get(subscription_id))["delivered"] == count

    async def deliveries(self, subscription_id: str, **params: str) -> list[dict[str, Any]]:
        response = await self.client.get(f"{SUBS}/{subscription_id}/deliveries", params=params)
        assert response.status_code == 200, response.text
        return response.json()["items"]


@pytest.fixture
async def subs(client: AsyncTestClient) -> AsyncIterator[Subscriptions]:
    subscriptions = Subscriptions(client)
    yield subscriptions
    for subscription_id in subscriptions.ids:
        await client.delete(f"{SUBS}/{subscription_id}")


@contextlib.asynccontextmanager
async def webhooks_service(
    service_env: dict[str, str], data_dir: Path, **env: str
) -> AsyncIterator[Service]:
    """The webhooks service, holding its lease; stopped with SIGTERM, which must be clean.
    Started and stopped in a thread: the receivers answer from this event loop meanwhile."""
    service = Service("services.webhooks", {**service_env, **WEBHOOK_ENV, **env}, data_dir)
    await asyncio.to_thread(service.start)
    try:
        await eventually(lambda: "acquired" in service.tail(100_000), timeout=15)
        yield service
    finally:
        code = await asyncio.to_thread(service.stop)
    assert code == 0, service.tail()


async def publish(js: JetStreamContext, device_id: str, **data: Any) -> m.CloudEvent:
    event = m.make_event(device_id, "telemetry", data)
    await bus.publish(js, event.nats_subject, event, msg_id=event.id)
    return event


def ids_of(received: list[Received]) -> list[str]:
    return [r.headers[webhooks.HEADER_ID] for r in received]


def batched_ids(received: list[Received]) -> list[str]:
    """The ids of the events in batched requests, request after request."""
    return [e["id"] for r in received for e in msgspec.json.decode(r.body)]


def verifies(secret: str, received: Received) -> bool:
    h = received.headers
    return webhooks.verify(
        secret,
        h[webhooks.HEADER_ID],
        h[webhooks.HEADER_TIMESTAMP],
        received.body,
        h[webhooks.HEADER_SIGNATURE],
    )


# --- delivery ----------------------------------------------------------------------------------


async def test_failing_endpoint_gets_the_event_once_after_backoff_with_a_valid_signature(
    subs: Subscriptions, js: JetStreamContext, service_env: dict[str, str], data_dir: Path
) -> None:
    device = unique_id()
    async with Receiver(fail_first=3) as receiver, webhooks_service(service_env, data_dir):
        sub = await subs.create(receiver, device)
        event = await publish(js, device, power_w=60.0)
        # In order: the next event waits behind the retries, and no copy of the first follows it.
        marker = await publish(js, device, power_w=0.0)
        await eventually(lambda: len(receiver.delivered) == 2, timeout=15)
        await eventually(lambda: subs.delivered(sub["id"], 2), timeout=10)
        deliveries = await subs.deliveries(sub["id"])

    assert [r.status for r in receiver.requests] == [500, 500, 500, 200, 200]
    assert ids_of(receiver.requests) == [event.id] * 4 + [marker.id]
    first = receiver.delivered[0]
    assert verifies(sub["secret"], first)
    assert not verifies(webhooks.new_secret(), first)
    assert first.headers["content-type"] == "application/cloudevents+json"
    assert m.cloud_event_decoder.decode(first.body) == event
    # Only the event that needed retries has a record; the marker is only counted.
    assert [(d["event_id"], d["status"], d["attempts"]) for d in deliveries] == [
        (event.id, "delivered", 4),
    ]
    assert deliveries[0]["last_status_code"] == 200
    assert deliveries[0]["source"] == "filter"


async def test_events_arrive_in_order_in_binary_mode(
    subs: Subscriptions, js: JetStreamContext, service_env: dict[str, str], data_dir: Path
) -> None:
    device = unique_id()
    async with Receiver() as receiver, webhooks_service(service_env, data_dir):
        sub = await subs.create(receiver, device, mode="binary")
        events = [await publish(js, device, n=n) for n in range(5)]
        await eventually(lambda: len(receiver.delivered) == 5, timeout=15)

    assert [r.headers["ce-id"] for r in receiver.requests] == [e.id for e in events]
    assert [msgspec.json.decode(r.body) for r in receiver.requests] == [{"n": n} for n in range(5)]
    first = receiver.requests[0]
    assert first.headers["content-type"] == "application/json"
    assert first.headers["ce-type"] == "telemetry"
    assert first.headers["ce-subject"] == device
    assert first.headers["ce-specversion"] == "1.0"
    assert all(verifies(sub["secret"], r) for r in receiver.requests)


async def test_a_hanging_endpoint_does_not_delay_other_subscriptions(
    subs: Subscriptions, js: JetStreamContext, service_env: dict[str, str], data_dir: Path
) -> None:
    stuck_device, device = unique_id(), unique_id()
    async with (
        Receiver(hang=True) as stuck,
        Receiver() as receiver,
        webhooks_service(service_env, data_dir),
    ):
        await subs.create(stuck, stuck_device)
        await subs.create(receiver, device)
        await publish(js, stuck_device, n=0)
        await publish(js, stuck_device, n=1)
        await eventually(lambda: stuck.hanging == 1, timeout=10)
        events = [await publish(js, device, n=n) for n in range(3)]
        await eventually(lambda: len(receiver.delivered) == 3, timeout=10)
        still_hanging = stuck.hanging

    assert still_hanging == 1, "the other deliveries waited for the hanging endpoint"
    assert [r.headers[webhooks.HEADER_ID] for r in receiver.delivered] == [e.id for e in events]
    assert len(stuck.requests) == 1  # its second event waits behind its first


async def test_killed_service_resumes_retries_and_delivers_exactly_once(
    subs: Subscriptions, js: JetStreamContext, service_env: dict[str, str], data_dir: Path
) -> None:
    device = unique_id()
    async with Receiver(fail_first=4) as receiver, webhooks_service(service_env, data_dir) as svc:
        sub = await subs.create(receiver, device)
        event = await publish(js, device, power_w=60.0)

        async def retrying() -> bool:
            pending = await subs.deliveries(sub["id"], status="pending")
            return bool(pending) and pending[0]["attempts"] >= 2

        await eventually(retrying, timeout=10)
        svc.kill9()
        await asyncio.to_thread(svc.start)
        # The dead owner's lease expires first: then the restarted service takes over.
        await eventually(lambda: svc.tail(100_000).count("acquired") >= 2, timeout=20)
        await eventually(lambda: receiver.delivered, timeout=15)
        marker = await publish(js, device, power_w=0.0)
        await eventually(lambda: len(receiver.delivered) == 2, timeout=10)
        deliveries = await subs.deliveries(sub["id"])

    assert ids_of(receiver.delivered) == [event.id, marker.id]
    assert [r.status for r in receiver.requests] == [500] * 4 + [200, 200]
    assert [(d["event_id"], d["status"]) for d in deliveries] == [(event.id, "delivered")]
    # An attempt the kill interrupted after the request may be missing from the record.
    assert deliveries[0]["attempts"] in (4, 5)


async def test_exhausted_retries_are_dead_lettered_and_redelivered_on_request(
    subs: Subscriptions,
    client: AsyncTestClient,
    js: JetStreamContext,
    service_env: dict[str, str],
    data_dir: Path,
) -> None:
    device = unique_id()
    service = webhooks_service(service_env, data_dir, SMARTHOME_WEBHOOK_RETRY_FOR="2")
    async with Receiver(fail_first=1_000) as receiver, service:
        sub = await subs.create(receiver, device)
        lost = await publish(js, device, power_w=60.0)
        failed = await eventually(lambda: subs.deliveries(sub["id"], status="failed"), timeout=15)
        receiver.fail_first = 0  # the endpoint is fixed
        # The dead letter no longer holds back the events after it.
        after = await publish(js, device, power_w=0.0)
        await eventually(lambda: receiver.delivered, timeout=10)
        redelivered = await client.post(f"{SUBS}/{sub['id']}/redeliver")
        await eventually(lambda: len(receiver.delivered) == 2, timeout=10)
        delivered = await eventually(
            lambda: subs.deliveries(sub["id"], status="delivered"), timeout=5
        )
        await eventually(lambda: subs.delivered(sub["id"], 2), timeout=10)
        still_failed = await subs.deliveries(sub["id"], status="failed")

    assert [d["event_id"] for d in failed] == [lost.id]
    assert failed[0]["attempts"] >= 2 and failed[0]["last_status_code"] == 500
    assert failed[0]["last_error"] == "5xx: HTTP 500"
    assert (redelivered.status_code, redelivered.json()) == (202, {"redelivered": 1})
    assert ids_of(receiver.delivered) == [after.id, lost.id]
    assert [d["event_id"] for d in delivered] == [lost.id]  # `after` went first time: no record
    assert still_failed == []


async def test_a_failed_delivery_shows_its_class_and_status_never_what_the_receiver_said(
    subs: Subscriptions, js: JetStreamContext, service_env: dict[str, str], data_dir: Path
) -> None:
    device = unique_id()
    secret_body = b"SECRET-BODY of the private address"
    telling = Scripted([answer(500, secret_body, "x-secret: SECRET-HEADER")] * 100)
    async with Receiver() as receiver, telling, webhooks_service(service_env, data_dir) as service:
        await subs.create(receiver, device)  # on 127.0.0.1, inside the allow-net: delivered
        refused_by = await subs.create(telling, device)
        event = await publish(js, device, power_w=60.0)
        await eventually(lambda: ids_of(receiver.delivered) == [event.id], timeout=15)
        records = await eventually(lambda: subs.deliveries(refused_by["id"]), timeout=15)
        log = service.tail(100_000)

    assert [(d["event_id"], d["status"]) for d in records] == [(event.id, "pending")]
    assert (records[0]["last_error"], records[0]["last_status_code"]) == ("5xx: HTTP 500", 500)
    assert "SECRET" not in str(records) and "SECRET" not in log


async def test_a_lost_consumer_is_made_again(
    subs: Subscriptions, js: JetStreamContext, service_env: dict[str, str], data_dir: Path
) -> None:
    device = unique_id()
    async with Receiver() as receiver:
        sub = await subs.create(receiver, device)
        await js.delete_consumer(subjects.EVENTS_STREAM, webhooks.consumer_name(sub["id"]))
        async with webhooks_service(service_env, data_dir) as service:
            await eventually(lambda: "was missing" in service.tail(100_000), timeout=10)
            event = await publish(js, device, power_w=1.0)
            await eventually(lambda: receiver.delivered, timeout=10)

    assert ids_of(receiver.delivered) == [event.id]


async def test_a_killed_service_resumes_mid_batch_in_order_without_losing_any(
    subs: Subscriptions, js: JetStreamContext, service_env: dict[str, str], data_dir: Path
) -> None:
    device = unique_id()
    async with Receiver(hang_at=3) as receiver, webhooks_service(service_env, data_dir) as svc:
        await subs.create(receiver, device)
        before = [await publish(js, device, n=n) for n in range(8)]
        await eventually(lambda: receiver.hanging == 1, timeout=10)
        svc.kill9()
        # Published while the service is down: the consumer must not hand these out before
        # the un-acked ones of the batch the killed service held.
        after = [await publish(js, device, n=n) for n in range(8, 12)]
        receiver.hang_at = None
        restarted_at = len(receiver.requests)
        await asyncio.to_thread(svc.start)
        await eventually(lambda: svc.tail(100_000).count("acquired") >= 2, timeout=20)
        await eventually(lambda: ids_of(receiver.delivered)[-1:] == [after[-1].id], timeout=15)

    ids = [e.id for e in before + after]
    resent = [r.headers[webhooks.HEADER_ID] for r in receiver.requests[restarted_at:]]
    # After the restart: from the first event not known to be delivered on, in order, once.
    assert resent == ids[len(ids) - len(resent) :]
    assert ids_of(receiver.delivered)[:3] == ids[:3]
    assert len(resent) >= len(ids) - 3


async def test_batched_mode_delivers_every_event_once_in_order_signed(
    subs: Subscriptions, js: JetStreamContext, service_env: dict[str, str], data_dir: Path
) -> None:
    device = unique_id()
    async with Receiver() as receiver, webhooks_service(service_env, data_dir):
        sub = await subs.create(receiver, device, mode="batched", batch_size=50)
        events = [m.make_event(device, "telemetry", {"n": n}) for n in range(300)]
        await bus.publish_many(js, [(e.nats_subject, e, e.id) for e in events])
        await eventually(lambda: len(batched_ids(receiver.delivered)) >= 300, timeout=20)
        await eventually(lambda: subs.delivered(sub["id"], 300), timeout=10)

    assert batched_ids(receiver.requests) == [e.id for e in events]
    assert sub["mode"] == "batched" and sub["batch_size"] == 50
    for request in receiver.requests:
        batch = msgspec.json.decode(request.body, type=list[m.CloudEvent])
        assert 1 <= len(batch) <= 50
        assert request.headers["content-type"] == "application/cloudevents-batch+json"
        assert request.headers["smarthome-count"] == str(len(batch))
        assert verifies(sub["secret"], request)
    assert len({r.headers[webhooks.HEADER_ID] for r in receiver.requests}) == len(receiver.requests)
    first = msgspec.json.decode(receiver.requests[0].body, type=list[m.CloudEvent])[0]
    assert first == events[0]


async def test_a_failed_batch_is_retried_as_it_was_then_the_rest_follows(
    subs: Subscriptions, js: JetStreamContext, service_env: dict[str, str], data_dir: Path
) -> None:
    device = unique_id()
    async with Receiver(fail_first=2) as receiver, webhooks_service(service_env, data_dir):
        sub = await subs.create(receiver, device, mode="batched", batch_size=3)
        events = [m.make_event(device, "telemetry", {"n": n}) for n in range(7)]
        await bus.publish_many(js, [(e.nats_subject, e, e.id) for e in events])
        await eventually(lambda: len(batched_ids(receiver.delivered)) == 7, timeout=15)
        deliveries = await subs.deliveries(sub["id"])

    failed, retried = receiver.requests[:2], receiver.requests[2]
    assert [r.status for r in failed] == [500, 500] and retried.status == 200
    assert {r.body for r in failed} == {retried.body}
    assert {ids_of([r])[0] for r in failed} == {ids_of([retried])[0]}
    assert batched_ids(receiver.delivered) == [e.id for e in events]
    # One record per event of the batch that needed retries, naming the request.
    first_batch = batched_ids([retried])
    assert [d["event_id"] for d in deliveries] == first_batch
    assert {(d["status"], d["attempts"], d["webhook_id"]) for d in deliveries} == {
        ("delivered", 3, ids_of([retried])[0])
    }


async def test_a_rules_notification_reaches_the_named_subscription_signed(
    subs: Subscriptions, js: JetStreamContext, service_env: dict[str, str], data_dir: Path
) -> None:
    async with Receiver(fail_first=1) as receiver, webhooks_service(service_env, data_dir):
        # Its filter matches nothing the alert is published on.
        sub = await subs.create(receiver, unique_id())
        alert = m.make_event(
            unique_id(), "alert", {"message": "too hot"}, source="rule/r1", event_id=unique_id()
        )
        # What the rules service publishes for a `notify` action naming the subscription.
        await bus.publish(js, subjects.notification(sub["id"]), alert, msg_id=alert.id)
        await eventually(lambda: receiver.delivered, timeout=15)
        deliveries = await subs.deliveries(sub["id"])

    delivered = receiver.delivered[0]
    assert [r.status for r in receiver.requests] == [500, 200]
    assert verifies(sub["secret"], delivered)
    assert delivered.headers[webhooks.HEADER_ID] == alert.id
    assert delivered.headers["smarthome-subject"] == subjects.notification(sub["id"])
    assert m.cloud_event_decoder.decode(delivered.body) == alert
    assert [(d["source"], d["event_id"], d["status"]) for d in deliveries] == [
        ("notify", alert.id, "delivered")
    ]


async def test_a_notification_goes_once_and_only_to_the_subscription_it_names(
    subs: Subscriptions, js: JetStreamContext, service_env: dict[str, str], data_dir: Path
) -> None:
    """A filter covering `system.notify.*` does not get the notifications of every
    subscription, nor its own a second time."""
    async with Receiver() as receiver, webhooks_service(service_env, data_dir):
        created = await subs.client.post(
            SUBS, json={"filter": subjects.NOTIFICATIONS_ALL, "url": receiver.url}
        )
        assert created.status_code == 201, created.text
        sub = created.json()
        subs.ids.append(sub["id"])
        alerts = [
            m.make_event(unique_id(), "alert", {"n": n}, event_id=unique_id()) for n in (1, 2)
        ]
        for alert in alerts:
            await bus.publish(js, subjects.notification(sub["id"]), alert, msg_id=alert.id)
        other = m.make_event(unique_id(), "alert", {"n": 3}, event_id=unique_id())
        ack = await bus.publish(js, subjects.notification(unique_id("sub")), other, msg_id=other.id)
        # The filter's consumer has passed all three (settled, acked) ...
        await eventually(lambda: _acked_through(js, webhooks.consumer_name(sub["id"]), ack.seq))
        # ... and the notify consumer delivered the two addressed to this subscription.
        await eventually(lambda: len(receiver.delivered) >= 2, timeout=15)

    assert ids_of(receiver.delivered) == [a.id for a in alerts]


async def _acked_through(js: JetStreamContext, durable: str, seq: int) -> bool:
    info = await js.consumer_info(subjects.SYSTEM_STREAM, durable)
    return info.ack_floor.stream_seq >= seq


async def test_a_notification_for_no_subscription_is_dead_lettered_with_the_reason(
    js: JetStreamContext, service_env: dict[str, str], data_dir: Path
) -> None:
    nobody = unique_id("sub")
    alert = m.make_event(unique_id(), "alert", {"message": "x"}, event_id=unique_id())
    dead_subject = subjects.deadletter(subjects.notification(nobody))

    async def dead_letter() -> Any:
        with contextlib.suppress(NotFoundError):
            return await js.get_last_msg(subjects.DEADLETTER_STREAM, dead_subject)
        return None

    async with webhooks_service(service_env, data_dir):
        await bus.publish(js, subjects.notification(nobody), alert, msg_id=alert.id)
        dead = await eventually(dead_letter, timeout=15)

    assert dead.headers is not None
    assert f"{nobody!r} does not exist" in dead.headers[bus.DL_REASON]
    assert dead.headers[bus.DL_CONSUMER] == bus.WEBHOOKS_NOTIFY_DURABLE
    assert m.cloud_event_decoder.decode(dead.data) == alert


# --- the sender --------------------------------------------------------------------------------


@dataclass
class Scripted:
    """An endpoint on 127.0.0.1 that answers its requests with `answers` in turn (raw HTTP/1.1
    responses; None: no answer at all), counting the connections it was opened."""

    answers: list[bytes | None]
    requests: list[Received] = field(default_factory=list)
    connections: int = 0
    _server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def __aenter__(self) -> Scripted:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in head[1:] if line)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append(Received(headers, body, None))
                answer = self.answers.pop(0)
                if answer is None:
                    await reader.read()  # until the client gives up
                    return
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def answer(status: int, body: bytes = b"", *headers: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in (*headers, f"content-length: {len(body)}"))
    return f"HTTP/1.1 {status} X\r\n{head}\r\n".encode() + body


PAYLOAD = Payload("msg_1", b'{"n": 1}', {"content-type": "application/json"})
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


LOOPBACK = webhooks.allow_nets(["127.0.0.0/8"])


async def send_all(
    url: str,
    *payloads: Payload,
    allow_nets: tuple[webhooks.IPNetwork, ...] = LOOPBACK,
    admin: bool = True,
    timeout_s: float = 5.0,
    resolver: AbstractResolver | None = None,
) -> list[Outcome]:
    settings = webhooks.WebhookSettings(allow_nets=allow_nets, timeout_s=timeout_s)
    async with make_session(settings, allow_private_targets=admin, resolver=resolver) as session:
        sender = Sender(session, settings, url, SECRET, allow_private_targets=admin)
        return [await sender.send(p) for p in payloads]


async def test_sender_signs_its_posts_and_keeps_its_connection_alive() -> None:
    refusal = b"no such device " * 100
    async with Scripted([answer(204), answer(500, refusal), answer(200, b"ok")]) as endpoint:
        outcomes = await send_all(endpoint.url, PAYLOAD, PAYLOAD, PAYLOAD)

    assert outcomes == [
        Outcome(True, 204),
        Outcome(False, 500, "5xx: HTTP 500"),
        Outcome(True, 200),
    ]
    assert endpoint.connections == 1, "a short answer was not read to its end"
    first = endpoint.requests[0]
    assert first.body == PAYLOAD.body and first.headers["content-type"] == "application/json"
    assert first.headers["user-agent"] == sender_mod.USER_AGENT
    assert verifies(SECRET, first)


async def test_sender_keeps_the_class_and_status_of_a_refusal_never_its_body() -> None:
    secret_body = b"SECRET-BODY: what the private address serves"
    answers = [answer(500, secret_body), answer(404, secret_body), answer(401, secret_body)]
    async with Scripted(answers) as endpoint:
        outcomes = await send_all(endpoint.url, PAYLOAD, PAYLOAD, PAYLOAD)

    assert outcomes == [
        Outcome(False, 500, "5xx: HTTP 500"),
        Outcome(False, 404, "4xx: HTTP 404"),
        Outcome(False, 401, "4xx: HTTP 401"),
    ]


async def test_sender_drops_the_connection_of_a_huge_answer_rather_than_read_it() -> None:
    huge = b"x" * (4 * sender_mod.DRAIN_BYTES)
    async with Scripted([answer(500, huge), answer(200)]) as endpoint:
        outcomes = await send_all(endpoint.url, PAYLOAD, PAYLOAD)

    assert outcomes == [Outcome(False, 500, "5xx: HTTP 500"), Outcome(True, 200)]
    assert endpoint.connections == 2


async def test_sender_does_not_follow_a_redirect() -> None:
    moved = answer(302, b"", "location: http://169.254.169.254/latest")
    async with Scripted([moved]) as endpoint:
        (outcome,) = await send_all(endpoint.url, PAYLOAD)

    assert outcome == Outcome(False, 302, "3xx: HTTP 302")
    assert len(endpoint.requests) == 1


async def test_sender_gives_up_on_a_silent_endpoint_after_its_timeout() -> None:
    async with Scripted([None]) as endpoint:
        (outcome,) = await send_all(endpoint.url, PAYLOAD, timeout_s=0.3)

    assert outcome == Outcome(False, None, "timeout: no answer within 0.3 s")


async def test_sender_reports_what_went_wrong_in_its_own_words_instead_of_raising() -> None:
    async with Scripted([]) as endpoint:
        closed = endpoint.url
    bad_header = Payload("msg_2", b"{}", {"x-note": "one\r\ntwo"})
    async with Scripted([]) as endpoint:
        outcomes = await send_all(closed, PAYLOAD) + await send_all(endpoint.url, bad_header)

    assert outcomes == [
        Outcome(False, None, "refused: the connection was refused"),
        Outcome(False, None, "invalid: the request could not be sent"),
    ]
    assert endpoint.requests == []


async def test_sender_says_tls_when_the_handshake_fails() -> None:
    async def not_tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(answer(200))  # plain HTTP where a TLS server hello belongs
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(not_tls, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        (outcome,) = await send_all(f"https://127.0.0.1:{port}/hook", PAYLOAD)

    assert outcome == Outcome(False, None, "tls: the TLS handshake failed")


@pytest.mark.parametrize(
    ("allow_nets", "admin"), [((), True), (LOOPBACK, False)], ids=["no-allow-net", "not-admin"]
)
async def test_sender_never_connects_to_a_refused_address(
    allow_nets: tuple[webhooks.IPNetwork, ...], admin: bool
) -> None:
    async with Scripted([answer(204)]) as endpoint:
        mapped = endpoint.url.replace("127.0.0.1", "[::ffff:127.0.0.1]")
        outcomes = [
            *await send_all(endpoint.url, PAYLOAD, allow_nets=allow_nets, admin=admin),
            *await send_all(mapped, PAYLOAD, allow_nets=allow_nets, admin=admin),
        ]

    assert all(not o.ok and o.error and o.error.startswith("blocked: ") for o in outcomes)
    assert "127.0.0.1 is a loopback address" in (outcomes[0].error or "")
    assert endpoint.connections == 0


class Rebinding(AbstractResolver):
    """A name server whose answer changes between lookups: the first answer goes to the
    check when the subscription is created, the later ones to the sender's connections."""

    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)
        self.lookups: list[str] = []

    def lookup(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        return [self.answers.pop(0)]

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        (address,) = self.lookup(host, port)
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
                "proto": 0,
                "flags": 0,
            }
        ]

    async def close(self) -> None:
        pass


async def test_a_name_that_resolves_elsewhere_after_the_check_is_not_connected_to() -> None:
    # 93.184.215.14 only ever reaches the check: nothing connects to a public address here.
    rebinding = Rebinding("93.184.215.14", "127.0.0.1")
    allowed = Rebinding("127.0.0.1")
    async with Scripted([answer(204)]) as endpoint:
        port = endpoint.port
        url = f"http://hooks.rebind.test:{port}/hook"
        webhooks.check_url(url, (), allow_private_targets=False, resolve=rebinding.lookup)
        (refused,) = await send_all(url, PAYLOAD, allow_nets=(), resolver=rebinding)
        (delivered,) = await send_all(url, PAYLOAD, allow_nets=LOOPBACK, resolver=allowed)

    assert rebinding.lookups == ["hooks.rebind.test", "hooks.rebind.test"]
    assert refused == Outcome(
        False,
        None,
        "blocked: hooks.rebind.test resolves to a loopback address outside "
        "SMARTHOME_WEBHOOK_ALLOW_NETS",
    )
    assert delivered == Outcome(True, 204)  # an allowed answer is connected to, by its name
    assert len(endpoint.requests) == 1
    assert endpoint.requests[0].headers["host"] == f"hooks.rebind.test:{port}"


# --- the API -----------------------------------------------------------------------------------


async def test_subscription_round_trip_never_shows_the_secret_again(
    client: AsyncTestClient, js: JetStreamContext
) -> None:
    body = {"filter": "system.alert.>", "url": "http://127.0.0.1:9/hook"}

    created = await client.post(SUBS, json=body)
    sub = created.json()
    consumer = await js.consumer_info(subjects.SYSTEM_STREAM, webhooks.consumer_name(sub["id"]))
    notify = await js.consumer_info(
        subjects.SYSTEM_STREAM, webhooks.notify_consumer_name(sub["id"])
    )
    fetched = await client.get(f"{SUBS}/{sub['id']}")
    listed = await client.get(SUBS, params={"limit": "500"})
    deleted = await client.delete(f"{SUBS}/{sub['id']}")
    gone = await client.get(f"{SUBS}/{sub['id']}")

    assert created.status_code == 201
    assert sub["secret"].startswith("whsec_") and sub["mode"] == "structured"
    assert sub["batch_size"] is None and sub["delivered"] == 0
    assert consumer.config.filter_subject == "system.alert.>"
    assert consumer.config.ack_policy == AckPolicy.ALL
    assert consumer.config.max_ack_pending == 2 * webhooks.FETCH_BATCH  # bounded in flight
    assert notify.config.filter_subject == subjects.notification(sub["id"])
    assert fetched.json() == {k: v for k, v in sub.items() if k != "secret"}
    assert sub["id"] in [s["id"] for s in listed.json()["items"]]
    assert all("secret" not in s for s in listed.json()["items"])
    assert deleted.status_code == 204 and gone.status_code == 404
    with pytest.raises(NotFoundError):
        await js.consumer_info(subjects.SYSTEM_STREAM, webhooks.consumer_name(sub["id"]))
    with pytest.raises(NotFoundError):
        await js.consumer_info(subjects.SYSTEM_STREAM, webhooks.notify_consumer_name(sub["id"]))


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ({"filter": "events..x"}, "$.filter", "not a subject filter"),
        ({"filter": "weather.>"}, "$.filter", "must start with events."),
        ({"url": "ftp://x/hook"}, "$.url", "http:// or https://"),
        ({"url": "not a url"}, "$.url", "http:// or https://"),
        ({"secret": "hunter2"}, "$.secret", "whsec_"),
        ({"mode": "smoke-signals"}, "$.mode", "Invalid enum value"),
        ({"mode": "batched", "batch_size": 0}, "$.batch_size", ">= 1"),
        ({"mode": "batched", "batch_size": 5000}, "$.batch_size", "<= 1000"),
        ({"mode": "binary", "batch_size": 10}, "$.batch_size", "mode `batched` only"),
    ],
)
async def test_bad_input_is_refused_naming_the_field(
    client: AsyncTestClient, body: dict[str, str], field: str, says: str
) -> None:
    valid = {"filter": "events.x.>", "url": "http://127.0.0.1:9/hook"}

    response = await client.post(SUBS, json=valid | body)

    assert response.status_code == 422, response.text
    problem = response.json()
    assert [e["field"] for e in problem["errors"]] == [field]
    assert field in problem["detail"] and says in problem["detail"]


PRIVATE_URLS = (
    "http://127.0.0.1:{port}/",
    "http://[::ffff:127.0.0.1]:{port}/",
    "http://[64:ff9b::7f00:1]:{port}/",
    "http://10.0.0.1/",
)


async def test_a_webhook_into_a_private_network_is_refused_without_an_allow_net(
    settings: Settings, admin_token: str
) -> None:
    strict = gateway_app(with_webhooks(settings, allow_nets=()))
    async with Scripted([]) as endpoint, AsyncTestClient(strict) as client:
        client.headers.update(bearer(admin_token))
        responses = [
            await client.post(SUBS, json={"filter": "events.x.>", "url": url.format(port=port)})
            for url in (*PRIVATE_URLS, "http://169.254.169.254/latest")
            for port in [endpoint.port]
        ]

    for response in responses:
        assert response.status_code == 422, response.text
        problem = response.json()
        assert [e["field"] for e in problem["errors"]] == ["$.url"]
        assert "outside SMARTHOME_WEBHOOK_ALLOW_NETS" in problem["detail"]
    assert "loopback" in responses[1].json()["detail"]
    assert "(that is 127.0.0.1)" in responses[2].json()["detail"]
    assert "private" in responses[3].json()["detail"]
    assert "metadata" in responses[4].json()["detail"]
    assert endpoint.connections == 0


async def test_an_admin_may_subscribe_a_loopback_url_inside_the_allow_nets(
    client: AsyncTestClient,
) -> None:
    created = [
        await client.post(SUBS, json={"filter": "events.x.>", "url": url.format(port=9)})
        for url in PRIVATE_URLS
    ]
    for response in created:
        if response.status_code == 201:
            await client.delete(f"{SUBS}/{response.json()['id']}")

    assert [r.status_code for r in created] == [201, 201, 201, 422]
    assert "10.0.0.1 is a private address outside" in created[3].json()["detail"]


async def test_a_non_admin_may_not_reach_a_private_address_even_inside_the_allow_nets(
    sessions: async_sessionmaker[AsyncSession], nc: NATS
) -> None:
    hooks = webhooks.WebhookSettings(allow_nets=LOOPBACK)
    service = SubscriptionService(sessions, nc, hooks)
    body = SubscriptionCreate(filter="events.x.>", url="http://127.0.0.1:9/")

    with pytest.raises(Invalid) as refused:
        await service.create(body, Context(RESIDENT, "c-1"), admin=False)

    assert refused.value.field == "$.url"
    assert "only an administrator" in str(refused.value)


async def test_unknown_subscription_and_bad_status_answer_problems(
    client: AsyncTestClient,
) -> None:
    missing = await client.get(f"{SUBS}/nope/deliveries")
    redeliver = await client.post(f"{SUBS}/nope/redeliver")
    sub = (
        await client.post(SUBS, json={"filter": "events.x.>", "url": "http://127.0.0.1:9/"})
    ).json()
    bad_status = await client.get(f"{SUBS}/{sub['id']}/deliveries", params={"status": "lost"})
    await client.delete(f"{SUBS}/{sub['id']}")

    assert missing.status_code == 404 and redeliver.status_code == 404
    assert bad_status.status_code == 422
    assert bad_status.json()["errors"][0]["field"] == "status"


async def test_events_lost_with_a_connection_are_delivered_once_in_order(
    subs: Subscriptions,
    js: JetStreamContext,
    service_env: dict[str, str],
    data_dir: Path,
    nats_url: str,
) -> None:
    """Events the bus handed out on a connection that died before they reached the service:
    the ack of a newer one on the next connection would ack them undelivered."""
    device = unique_id()
    relay = Relay(int(nats_url.rsplit(":", 1)[1]))
    try:
        async with (
            Receiver() as receiver,
            webhooks_service(service_env, data_dir, NATS_URL=relay.url) as service,
        ):
            sub = await subs.create(receiver, device)
            events = [await publish(js, device, n=n) for n in range(3)]
            await eventually(lambda: len(receiver.delivered) == 3, timeout=15)
            relay.drop()
            events += [await publish(js, device, n=n) for n in range(3, 6)]
            last = (await js.stream_info(subjects.EVENTS_STREAM)).state.last_seq
            await eventually(lambda: _handed_out(js, sub["id"], last), timeout=15)
            relay.cut()
            events += [await publish(js, device, n=n) for n in range(6, 9)]
            await eventually(lambda: len(receiver.delivered) >= 9, timeout=30)
            log = service.tail(100_000)
    finally:
        relay.close()
    assert ids_of(receiver.delivered) == [e.id for e in events]
    assert "deliveries never received" in log


async def _handed_out(js: JetStreamContext, subscription_id: str, last_seq: int) -> bool:
    info = await js.consumer_info(subjects.EVENTS_STREAM, webhooks.consumer_name(subscription_id))
    return info.delivered.stream_seq >= last_seq


async def test_creating_and_deleting_a_subscription_are_facts_for_the_audit_without_secrets(
    client: AsyncTestClient, js: JetStreamContext
) -> None:
    url = "http://bob:hunter2@127.0.0.1:9/hook?token=abc#frag"
    created = await client.post(SUBS, json={"filter": "events.x.>", "url": url})
    assert created.status_code == 201, created.text
    sub_id = created.json()["id"]
    shown = created.json()["url"], (await client.get(f"{SUBS}/{sub_id}")).json()["url"]
    await client.delete(f"{SUBS}/{sub_id}")

    async def both_facts() -> list[m.ChangeFact]:
        # Published by the outbox's relay after each commit: a moment after the answer.
        facts = await collected(js, webhooks.subscription_changed(sub_id), m.change_fact_decoder)
        assert len(facts) == 2, facts
        return facts

    facts = await eventually(both_facts, timeout=5)
    assert [(f.what, f.id, f.change) for f in facts] == [
        ("subscription", sub_id, "created"),
        ("subscription", sub_id, "deleted"),
    ]
    assert {f.detail["url"] for f in facts} == {"http://127.0.0.1:9/hook"}
    assert shown == ("http://127.0.0.1:9/hook", "http://127.0.0.1:9/hook")
    assert facts[0].correlation_id == created.headers["X-Correlation-Id"]
