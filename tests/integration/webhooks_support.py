"""What the webhook tests share: the gateway in-process with the subscriptions API, the
webhooks service as a real process, HTTP receivers on 127.0.0.1 that fail, hang or answer as
scripted, and a name server whose answers change."""

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
from nats.js import JetStreamContext

from libs import bus, subjects, webhooks
from libs import messages as m
from libs.principals import Principal, PrincipalKind, Role
from libs.settings import Settings
from services.gateway.app import API_PREFIX, create_app
from services.gateway.subscriptions.controllers import SubscriptionController
from services.webhooks.payload import Payload
from services.webhooks.sender import Outcome, Sender, make_session
from tests.api import bearer
from tests.helpers import eventually
from tests.processes import Service

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


# --- scripted endpoints and the sender ------------------------------------------------------


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
