"""Every device and service has its own identity on the bus, enforced by nats-server: the
session's server has no anonymous user; the busauth service answers its auth callout from
the registry. A device may publish only `events.<id>.>` and read only `commands.<id>`."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from libs import bus, bus_grants, subjects
from libs import messages as m
from libs.db.models import BusCredential, Device
from libs.passwords import digest, new_secret
from tests.factories import add_devices, register_device
from tests.helpers import eventually, unique_id
from tests.processes import Service


@pytest.fixture(scope="module")
def busauth(service_env, data_dir, js):  # type: ignore[no-untyped-def]
    service = Service("services.busauth", service_env, data_dir).start()
    yield service
    assert service.stop() == 0, service.tail()


@pytest.fixture(scope="module")
def actors(service_env, data_dir, js):  # type: ignore[no-untyped-def]
    service = Service("services.actors", service_env, data_dir).start()
    yield service
    assert service.stop() == 0, service.tail()


@dataclass
class Registered:
    id: str
    password: str


@pytest.fixture
async def register(sessions, js) -> Callable[..., Awaitable[Registered]]:  # type: ignore[no-untyped-def]
    """A device in the registry with bus credentials (as the gateway stores them) and its
    durable consumer of commands (as the gateway makes it)."""

    async def make(lifecycle: str = "active", location: str | None = None) -> Registered:
        device = Registered(unique_id("dev"), new_secret("smd_"))
        await add_devices(sessions, device.id, lifecycle=lifecycle, location=location)
        async with sessions.begin() as session:
            session.add(
                BusCredential(
                    identity=device.id, secret_hash=digest(device.password), issued_by="test"
                )
            )
        await js.add_consumer(
            subjects.COMMANDS_STREAM,
            ConsumerConfig(
                durable_name=bus_grants.device_durable(device.id),
                filter_subject=subjects.commands(device.id),
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.NEW,
            ),
        )
        return device

    return make


class Connection:
    """A device's NATS connection that records what the server refused it."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc: NATS | None = None
        self.closed = asyncio.Event()

    async def open(self, url: str, user: str | None, password: str | None, **options) -> NATS:  # type: ignore[no-untyped-def]
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))

        async def on_closed() -> None:
            self.closed.set()

        auth = {"user": user, "password": password} if user else {}
        inbox = bus_grants.inbox_prefix("dev", user) if user else "_INBOX"
        self.nc = await nats.connect(
            url,
            error_cb=on_error,
            closed_cb=on_closed,
            allow_reconnect=False,
            connect_timeout=5,
            inbox_prefix=inbox,
            **auth,
            **options,
        )
        return self.nc

    def refused(self, subject: str) -> bool:
        return any(
            "permissions violation" in e.lower() and subject.lower() in e.lower()
            for e in self.errors
        )


@pytest.fixture
async def connection() -> AsyncIterator[Callable[[], Connection]]:
    made: list[Connection] = []

    def make() -> Connection:
        made.append(Connection())
        return made[-1]

    yield make
    for c in made:
        if c.nc is not None and not c.nc.is_closed:
            with contextlib.suppress(Exception):
                await c.nc.close()


async def refused_at_connect(url: str, **auth) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(Exception) as caught:
        nc = await nats.connect(url, allow_reconnect=False, connect_timeout=5, **auth)
        await nc.close()
    return str(caught.value).lower()


async def test_anonymous_and_wrong_passwords_are_refused_at_connect(
    busauth, nats_url, register
) -> None:  # type: ignore[no-untyped-def]
    device = await register()

    assert "authorization" in await refused_at_connect(nats_url)
    assert "authorization" in await refused_at_connect(
        nats_url, user=device.id, password="not-" + device.password
    )
    assert "authorization" in await refused_at_connect(nats_url, user="gateway", password="guessed")
    assert "authorization" in await refused_at_connect(
        nats_url, user=unique_id("nobody"), password=new_secret("smd_")
    )


@pytest.mark.parametrize("lifecycle", ["pending", "rejected", "decommissioned"])
async def test_a_device_not_active_is_refused_with_its_right_password(
    busauth, nats_url, register, lifecycle
) -> None:  # type: ignore[no-untyped-def]
    device = await register(lifecycle)

    assert "authorization" in await refused_at_connect(
        nats_url, user=device.id, password=device.password
    )


async def test_a_device_may_speak_only_for_itself(
    busauth, actors, nats_url, register, connection, js, sessions
) -> None:  # type: ignore[no-untyped-def]
    a, b = await register(), await register()
    b_event = m.make_event(b.id, "telemetry", {"power_w": 1.0})
    await bus.publish(js, b_event.nats_subject, b_event, msg_id=b_event.id)
    b_before = await eventually(lambda: _state(sessions, b.id), timeout=10)
    conn = connection()
    nc = await conn.open(nats_url, a.id, a.password)
    js_a = nc.jetstream()

    # Its own events are taken and stored.
    own = m.make_event(a.id, "telemetry", {"power_w": 5.0})
    ack = await js_a.publish(own.nats_subject, m.encode(own), headers={bus.MSG_ID: own.id})
    assert ack.stream == subjects.EVENTS_STREAM

    # Another device's subject: refused by the server, nothing stored.
    forged = m.make_event(b.id, "telemetry", {"power_w": 9999.0})
    await nc.publish(forged.nats_subject, m.encode(forged))
    for subject in (subjects.commands(b.id), "commands.>", ">", "deadletter.>"):
        await nc.subscribe(subject)
    await nc.publish(f"{bus_grants.JS}.STREAM.PURGE.{subjects.DEADLETTER_STREAM}", b"{}")
    await nc.publish(f"{bus_grants.JS}.STREAM.INFO.KV_rule_episodes", b"")
    await nc.publish(f"$KV.{bus_grants.EPISODES}.x", b"forged")
    await nc.publish(subjects.commands(b.id), b"{}")
    await nc.flush()

    expected = (
        forged.nats_subject,
        subjects.commands(b.id),
        "commands.>",
        '">"',
        f"STREAM.PURGE.{subjects.DEADLETTER_STREAM}",
        "KV_rule_episodes",
        f"$KV.{bus_grants.EPISODES}.x",
    )
    await eventually(lambda: _all_refused(conn, expected), timeout=5)
    stored = await js.get_last_msg(
        subjects.EVENTS_STREAM, subjects.stored_filter(forged.nats_subject)
    )
    assert m.cloud_event_decoder.decode(stored.data).id == b_event.id  # not the forged one
    assert await _state(sessions, b.id) == b_before  # B's state unchanged
    await eventually(lambda: _state(sessions, a.id), timeout=10)  # A's own event applied
    assert nc.is_connected  # a refused subject is not a reason to disconnect


async def test_a_device_reads_and_acks_its_own_durable_commands(
    busauth, nats_url, register, connection, js
) -> None:  # type: ignore[no-untyped-def]
    device, other = await register(), await register()
    conn = connection()
    nc = await conn.open(nats_url, device.id, device.password)
    js_dev = nc.jetstream()
    await js.publish(subjects.commands(device.id), b'{"for": "me"}')

    sub = await js_dev.pull_subscribe(
        subjects.commands(device.id),
        durable=bus_grants.device_durable(device.id),
        stream=subjects.COMMANDS_STREAM,
    )
    [msg] = await sub.fetch(1, timeout=5)
    await msg.ack_sync()
    assert msg.data == b'{"for": "me"}'

    # Another device's consumer: neither read nor made.
    stolen = f"{bus_grants.JS}.CONSUMER.MSG.NEXT.COMMANDS.{bus_grants.device_durable(other.id)}"
    await nc.publish(stolen, b'{"batch": 1}', reply=nc.new_inbox())
    made = f"{bus_grants.JS}.CONSUMER.CREATE.COMMANDS.mine.commands.{device.id}"
    await nc.publish(made, b"{}", reply=nc.new_inbox())
    await nc.flush()
    await eventually(lambda: conn.refused(stolen) and conn.refused(made), timeout=5)


def _all_refused(conn: Connection, expected: tuple[str, ...]) -> bool:
    missing = [s for s in expected if not conn.refused(s)]
    assert not missing, (missing, conn.errors)
    return True


async def _state(sessions, device_id: str):  # type: ignore[no-untyped-def]
    from libs.db.models import DeviceState

    async with sessions() as session:
        row = await session.get(DeviceState, device_id)
        return None if row is None else (row.version, dict(row.attributes or {}))


async def _rotate(sessions, js, device: Registered) -> str:  # type: ignore[no-untyped-def]
    """What the gateway does on POST /devices/{id}/credentials: a new hash, then the fact."""
    password = new_secret("smd_")
    async with sessions.begin() as session:
        row = await session.get(BusCredential, device.id)
        row.secret_hash, row.generation = digest(password), row.generation + 1
    fact = m.ChangeFact(
        what="credentials", id=device.id, change="rotated", actor="user:test",
        correlation_id=unique_id("corr"), time=m.now(),
    )  # fmt: skip
    await bus.publish(js, subjects.credentials_changed(device.id), fact, msg_id=m.new_id())
    return password


async def test_rotated_credentials_close_the_live_connection_and_refuse_the_old_password(
    busauth, nats_url, register, connection, sessions, js
) -> None:  # type: ignore[no-untyped-def]
    device = await register()
    conn = connection()
    await conn.open(nats_url, device.id, device.password)

    new_password = await _rotate(sessions, js, device)

    await asyncio.wait_for(conn.closed.wait(), timeout=10)
    assert "authorization" in await refused_at_connect(
        nats_url, user=device.id, password=device.password
    )
    fresh = connection()
    assert (await fresh.open(nats_url, device.id, new_password)).is_connected


async def test_decommissioning_a_device_closes_its_connection(
    busauth, nats_url, register, connection, sessions, js
) -> None:  # type: ignore[no-untyped-def]
    device = await register()
    conn = connection()
    await conn.open(nats_url, device.id, device.password)

    # The gateway publishes the registry fact inside its transaction: the connection is
    # closed on the fact's word even before the row says so.
    fact = m.RegistryFact(
        device_id=device.id, change="updated", actor="user:test",
        correlation_id=unique_id("corr"), time=m.now(),
        device={"id": device.id, "lifecycle": "decommissioned"},
    )  # fmt: skip
    await bus.publish(js, subjects.device_registry(device.id), fact, msg_id=m.new_id())

    await asyncio.wait_for(conn.closed.wait(), timeout=10)
    assert "authorization" in await refused_at_connect(
        nats_url, user=device.id, password=device.password
    )


# --- over HTTP: registration, rotation -------------------------------------------------------


async def test_registration_answers_credentials_once_that_work_on_the_bus(
    busauth, nats_url, client, connection
) -> None:  # type: ignore[no-untyped-def]
    device_id = unique_id("dev")
    registered = await register_device(client, id=device_id, name="d", kind="sensor")
    credentials = registered["credentials"]
    assert credentials["username"] == device_id and len(credentials["password"]) > 40
    assert "credentials" not in (await client.get(f"/api/v1/devices/{device_id}")).json()

    conn = connection()
    nc = await conn.open(nats_url, device_id, credentials["password"])
    event = m.make_event(device_id, "hello", {})
    ack = await nc.jetstream().publish(event.nats_subject, m.encode(event))
    assert ack.stream == subjects.EVENTS_STREAM


async def test_rotation_over_http_closes_the_old_connection_within_10_seconds(
    busauth, nats_url, client, connection
) -> None:  # type: ignore[no-untyped-def]
    device_id = unique_id("dev")
    registered = await register_device(client, id=device_id, name="d", kind="sensor")
    old = registered["credentials"]["password"]
    conn = connection()
    await conn.open(nats_url, device_id, old)

    rotated_at = time.monotonic()
    r = await client.post(f"/api/v1/devices/{device_id}/credentials")
    assert r.status_code == 201, r.text
    new = r.json()["password"]

    await asyncio.wait_for(conn.closed.wait(), timeout=10)
    print(f"live connection closed {time.monotonic() - rotated_at:.2f} s after the rotation")
    assert "authorization" in await refused_at_connect(nats_url, user=device_id, password=old)
    assert (await connection().open(nats_url, device_id, new)).is_connected


# --- discovery with auth on: provisioning tokens and the claim ---------------------------------


async def test_a_claimed_device_gets_its_credentials_on_approval_and_its_events_land(
    busauth, actors, nats_url, settings, admin_token, sessions
) -> None:  # type: ignore[no-untyped-def]
    from devices.platform_link import PlatformLink
    from services.gateway.app import create_app
    from tests.integration.test_gateway_ws import serving

    device_id = unique_id("claimed")
    async with serving(create_app(settings), admin_token) as gateway:
        r = await gateway.http.post(
            "/api/v1/provisioning-tokens", json={"home": "home-c", "max_uses": 1}
        )
        assert r.status_code == 201, r.text
        token = r.json()["token"]
        link = PlatformLink(
            device_id, "sensor", "Claimed sensor", str(gateway.http.base_url), nats_url
        )
        stop = asyncio.Event()
        claiming = asyncio.create_task(link.claim(token, stop, hello_every=0.5))

        pending = await eventually(lambda: _device_row(sessions, device_id), timeout=10)
        assert (pending.lifecycle, pending.location) == ("pending", "home-c")
        r = await gateway.http.patch(f"/api/v1/devices/{device_id}", json={"lifecycle": "active"})
        assert r.status_code == 200, r.text

        assert await asyncio.wait_for(claiming, timeout=15)
        await link.connect()
        try:
            await link.publish("telemetry", {"temperature_c": 20.5})
            state = await eventually(lambda: _state(sessions, device_id), timeout=10)
            assert state[1].get("temperature_c") == 20.5
        finally:
            await link.close()


async def test_a_provisioning_token_past_its_uses_or_expiry_is_refused(
    busauth, nats_url, sessions
) -> None:  # type: ignore[no-untyped-def]
    from datetime import timedelta

    from libs.db.models import ProvisioningToken

    used_up, expired = new_secret("smpt_"), new_secret("smpt_")
    async with sessions.begin() as session:
        for secret, uses, expires in ((used_up, 1, 3600), (expired, 0, -1)):
            session.add(
                ProvisioningToken(
                    id=unique_id("pt"), token_hash=digest(secret), home="home-x",
                    expires_at=m.now() + timedelta(seconds=expires), max_uses=1, uses=uses,
                    created_by="test",
                )
            )  # fmt: skip
    for secret in (used_up, expired):
        assert "authorization" in await refused_at_connect(
            nats_url, user=unique_id("dev"), password=secret, name="n" * 32
        )


async def test_a_claimant_may_only_say_hello(busauth, nats_url, sessions, connection) -> None:  # type: ignore[no-untyped-def]
    from datetime import timedelta

    from libs.db.models import ProvisioningToken

    secret, device_id, nonce = new_secret("smpt_"), unique_id("dev"), "n" * 32
    async with sessions.begin() as session:
        session.add(
            ProvisioningToken(
                id=unique_id("pt"), token_hash=digest(secret), home="home-y",
                expires_at=m.now() + timedelta(hours=1), max_uses=5, uses=0, created_by="test",
            )
        )  # fmt: skip
    conn = connection()
    nc = await conn.open(nats_url, device_id, secret, name=nonce)
    telemetry = subjects.device_events(device_id, "telemetry")
    await nc.publish(telemetry, b"{}")
    await nc.subscribe(subjects.provision(device_id, "another-nonce-0000"))
    await nc.flush()
    await eventually(lambda: _all_refused(conn, (telemetry, "another-nonce")), timeout=5)
    # Another connection with the same token cannot take the claimed id.
    assert "authorization" in await refused_at_connect(
        nats_url, user=device_id, password=secret, name="m" * 32
    )


async def _device_row(sessions, device_id: str):  # type: ignore[no-untyped-def]
    async with sessions() as session:
        return await session.get(Device, device_id)


# --- bridges ---------------------------------------------------------------------------------


async def test_a_bridge_speaks_for_exactly_its_devices_of_its_home(
    busauth, nats_url, sessions, connection, js
) -> None:  # type: ignore[no-untyped-def]
    from libs.db.models import Bridge, BridgeDevice

    bridge_id, password = unique_id("hub"), new_secret("smb_")
    member, elsewhere, stranger = unique_id("dev"), unique_id("dev"), unique_id("dev")
    async with sessions.begin() as session:
        session.add(Bridge(id=bridge_id, name="hub", home="home-b", created_by="test"))
        session.add(
            BusCredential(
                identity=f"bridge:{bridge_id}", secret_hash=digest(password), issued_by="test"
            )
        )
        await session.flush()
        for device_id, location in ((member, "home-b/hall"), (elsewhere, "home-z/hall")):
            session.add(Device(id=device_id, name="d", kind="sensor", location=location))
            session.add(BridgeDevice(device_id=device_id, bridge_id=bridge_id))
        session.add(Device(id=stranger, name="d", kind="sensor", location="home-b/hall"))
    conn = connection()
    nc = await nats.connect(
        nats_url, user=f"bridge:{bridge_id}", password=password, allow_reconnect=False,
        inbox_prefix=bus_grants.inbox_prefix("bridge", bridge_id),
        error_cb=_recorder(conn), closed_cb=_closed(conn),
    )  # fmt: skip
    conn.nc = nc

    event = m.make_event(member, "telemetry", {"n": 1})
    assert (await nc.jetstream().publish(event.nats_subject, m.encode(event))).stream == "EVENTS"
    await nc.subscribe(subjects.commands(member))
    # Attached to it but in another home, or of its home but not attached: neither.
    for device_id in (elsewhere, stranger):
        await nc.publish(subjects.device_events(device_id, "telemetry"), b"{}")
        await nc.subscribe(subjects.commands(device_id))
    await nc.flush()
    refused = [subjects.device_events(d, "telemetry") for d in (elsewhere, stranger)]
    refused += [subjects.commands(d) for d in (elsewhere, stranger)]
    await eventually(lambda: _all_refused(conn, tuple(refused)), timeout=5)
    assert not conn.refused(subjects.commands(member))

    # One of its devices rejected: the bridge's connection is closed (it reconnects without).
    fact = m.RegistryFact(
        device_id=member, change="updated", actor="user:test", correlation_id=unique_id("c"),
        time=m.now(), device={"id": member, "lifecycle": "rejected"},
    )  # fmt: skip
    await bus.publish(js, subjects.device_registry(member), fact, msg_id=m.new_id())
    await asyncio.wait_for(conn.closed.wait(), timeout=10)


def _recorder(conn: Connection):  # type: ignore[no-untyped-def]
    async def on_error(exc: Exception) -> None:
        conn.errors.append(str(exc))

    return on_error


def _closed(conn: Connection):  # type: ignore[no-untyped-def]
    async def on_closed() -> None:
        conn.closed.set()

    return on_closed
