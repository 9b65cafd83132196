"""Devices over MQTT: a paho-mqtt client on the session nats-server's MQTT listener, with
the actors running as a process. The device knows only the topics and the CloudEvent
envelope, as third-party hardware would."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable

import nats
import nats.js.errors
import paho.mqtt.client as mqtt
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy
from paho.mqtt.enums import CallbackAPIVersion

from libs import bus, commands, subjects
from libs import messages as m
from libs.db.models import BusCredential, CommandRecord, Device, DeviceState
from libs.passwords import digest, new_secret
from tests.helpers import eventually, unique_id
from tests.processes import Service


class MqttDevice:
    """A device that speaks only MQTT 3.1.1 (what nats-server implements)."""

    def __init__(
        self, device_id: str, port: int, password: str | None = None, client_id: str | None = None
    ) -> None:
        self.device_id = device_id
        self.port = port
        self.password = password or new_secret("smd_")
        self.connack: list[str] = []
        self.received: list[mqtt.MQTTMessage] = []
        self._subscribed: set[int] = set()
        # paho calls these from its network thread; list and set appends are atomic.
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id or device_id, protocol=mqtt.MQTTv311
        )
        # The same username and password as over NATS: the device id and its bus password.
        self.client.username_pw_set(device_id, self.password)
        self.client.on_connect = lambda _c, _u, _f, code, _p: self.connack.append(str(code))
        self.client.on_message = lambda _c, _u, msg: self.received.append(msg)
        self.granted: dict[int, list[str]] = {}
        self.client.on_subscribe = self._on_subscribe

    def _on_subscribe(self, _c, _u, mid, codes, _p) -> None:  # type: ignore[no-untyped-def]
        self.granted[mid] = [str(c) for c in codes]
        self._subscribed.add(mid)

    async def connect(self) -> None:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        await eventually(self.client.is_connected)

    async def subscribe(self, subject: str) -> list[str]:
        """What the server granted (SUBACK): `Granted QoS 1`, or `Unspecified error`."""
        _, mid = self.client.subscribe(subjects.mqtt_topic(subject), qos=1)
        await eventually(lambda: mid in self._subscribed)
        return self.granted[mid]

    async def publish(self, subject: str, payload: bytes) -> None:
        """QoS 1: back once the server acknowledged it (PUBACK)."""
        info = self.client.publish(subjects.mqtt_topic(subject), payload, qos=1)
        await eventually(info.is_published)

    async def send(
        self, event_type: str, data: dict | None = None, correlation_id: str | None = None
    ) -> m.CloudEvent:
        event = m.make_event(self.device_id, event_type, data, correlation_id=correlation_id)
        await self.publish(event.nats_subject, m.encode(event))
        return event

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def actors(service_env, data_dir):  # type: ignore[no-untyped-def]
    service = Service("services.actors", service_env, data_dir).start()
    yield service
    assert service.stop() == 0, service.tail()


@pytest.fixture(scope="module")
def busauth(service_env, data_dir, js):  # type: ignore[no-untyped-def]
    """The bus's auth callout: an MQTT device connects with its id and bus password."""
    service = Service("services.busauth", service_env, data_dir).start()
    yield service
    assert service.stop() == 0, service.tail()


@pytest.fixture
async def mqtt_device(
    busauth, mqtt_port: int, sessions
) -> AsyncIterator[Callable[[], Awaitable[MqttDevice]]]:  # type: ignore[no-untyped-def]
    """A registered device, connected over MQTT; disconnected after the test."""
    made: list[MqttDevice] = []

    async def make() -> MqttDevice:
        device = MqttDevice(unique_id("mqtt"), mqtt_port)
        async with sessions.begin() as session:
            session.add(Device(id=device.device_id, name="MQTT device", kind="sensor"))
            session.add(
                BusCredential(
                    identity=device.device_id, secret_hash=digest(device.password), issued_by="test"
                )
            )
        await device.connect()
        made.append(device)
        return device

    yield make
    for device in made:
        device.close()


async def facts(js, device_id: str, until: Callable[[list[m.DeviceStateFact]], bool]):  # type: ignore[no-untyped-def]
    """The device's state facts on the SYSTEM stream, read until `until` holds."""
    sub = await js.subscribe(
        subjects.device_state(device_id),
        ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
    )
    seen: list[m.DeviceStateFact] = []
    try:
        while not until(seen):
            seen.append(m.state_fact_decoder.decode((await sub.next_msg(timeout=10)).data))
    finally:
        await sub.unsubscribe()
    return seen


async def test_telemetry_over_mqtt_becomes_the_device_state(actors, js, mqtt_device) -> None:  # type: ignore[no-untyped-def]
    device = await mqtt_device()

    event = await device.send("telemetry", {"power_w": 60.0, "on": True})

    seen = await facts(
        js, device.device_id, lambda fs: any(f.cause_event_id == event.id for f in fs)
    )
    assert (seen[-1].state, seen[-1].connection) == ("active", "online")
    assert seen[-1].attributes == {"power_w": 60.0, "on": True}
    # The stream holds the envelope as sent; an MQTT publish carries no Nats-Msg-Id.
    stored = await js.get_last_msg(
        subjects.EVENTS_STREAM, subjects.stored_filter(event.nats_subject)
    )
    assert m.cloud_event_decoder.decode(stored.data) == event
    assert bus.MSG_ID not in (stored.headers or {})


async def test_mqtt_events_of_a_device_are_applied_in_order(actors, js, mqtt_device) -> None:  # type: ignore[no-untyped-def]
    device = await mqtt_device()
    subject = subjects.device_events(device.device_id, "telemetry")

    sent = [m.make_event(device.device_id, "telemetry", {"n": n}) for n in range(20)]
    infos = [device.client.publish(subjects.mqtt_topic(subject), m.encode(e), qos=1) for e in sent]
    await eventually(lambda: all(i.is_published() for i in infos))

    seen = await facts(js, device.device_id, lambda fs: any(f.attributes == {"n": 19} for f in fs))
    readings = [f for f in seen if f.cause_type == "telemetry"]
    assert [f.attributes["n"] for f in readings] == list(range(20))
    assert [f.version for f in readings] == list(range(1, 21))


async def test_a_resent_mqtt_event_is_stored_again_and_changes_nothing(
    actors, js, mqtt_device
) -> None:  # type: ignore[no-untyped-def]
    """No Nats-Msg-Id over MQTT, so JetStream cannot drop a QoS 1 resend: the actors apply
    the copy again, which leaves the same attributes and so no new version."""
    device = await mqtt_device()
    first = m.make_event(device.device_id, "telemetry", {"power_w": 5.0})

    for _ in range(2):  # what a device's resend after a lost PUBACK puts on the bus
        await device.publish(first.nats_subject, m.encode(first))
    second = await device.send("telemetry", {"power_w": 6.0})

    seen = await facts(
        js, device.device_id, lambda fs: any(f.cause_event_id == second.id for f in fs)
    )
    readings = [f for f in seen if f.cause_type == "telemetry"]
    assert [(f.cause_event_id, f.version) for f in readings] == [(first.id, 1), (second.id, 2)]
    stored = subjects.stored_filter(first.nats_subject)
    info = await js.stream_info(subjects.EVENTS_STREAM, subjects_filter=stored)
    assert {subjects.published(s): n for s, n in info.state.subjects.items()} == {
        first.nats_subject: 3
    }


async def test_a_command_reaches_the_mqtt_device_and_its_status_is_recorded(
    actors, js, sessions, mqtt_device
) -> None:  # type: ignore[no-untyped-def]
    device = await mqtt_device()
    await device.subscribe(subjects.commands(device.device_id))
    command = commands.new(
        device_id=device.device_id,
        action="turn_off",
        params={},
        expires_s=60,
        issued_by="test",
        correlation_id=m.new_id(),
    )

    await commands.send(sessions, js, command)

    (msg,) = await eventually(lambda: device.received)
    assert msg.topic == subjects.mqtt_topic(subjects.commands(device.device_id))
    assert msg.qos == 0  # nats-server delivers what NATS clients publish at QoS 0
    got = m.command_decoder.decode(msg.payload)
    assert got == command
    for status in ("delivered", "done"):
        data = {"command_id": got.id, "status": status, "detail": None}
        await device.send("command_status", data, correlation_id=got.correlation_id)

    async def recorded() -> CommandRecord | None:
        async with sessions() as session:
            row = await session.get(CommandRecord, command.id)
            return row if row is not None and row.status == "done" else None

    row = await eventually(recorded)
    assert row.correlation_id == command.correlation_id


async def test_a_malformed_mqtt_payload_is_dead_lettered_with_its_reason(
    actors, js, mqtt_device
) -> None:  # type: ignore[no-untyped-def]
    device = await mqtt_device()
    subject = subjects.device_events(device.device_id, "telemetry")
    wrong_type = m.make_event(device.device_id, "state", {"power_w": 1.0})

    await device.publish(subject, b'{"id": "x", "broken json')
    await device.publish(subject, m.encode(wrong_type))  # its envelope names another topic
    good = await device.send("telemetry", {"power_w": 7.0})

    await facts(js, device.device_id, lambda fs: any(f.cause_event_id == good.id for f in fs))
    sub = await js.subscribe(
        subjects.deadletter(subject),
        ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
    )
    letters = [await sub.next_msg(timeout=10), await sub.next_msg(timeout=10)]
    await sub.unsubscribe()
    assert letters[0].data == b'{"id": "x", "broken json'
    assert letters[0].headers[bus.DL_REASON].startswith("invalid event: ")
    assert "type='state' but was published on" in letters[1].headers[bus.DL_REASON]
    assert json.loads(letters[1].data)["id"] == wrong_type.id
    assert all(msg.headers[bus.DL_CONSUMER].startswith("actors-") for msg in letters)


# --- the bus's identities over MQTT: the same credentials, the same rights -----------------


async def _refused_connack(device: MqttDevice) -> str:
    device.client.connect("127.0.0.1", device.port)
    device.client.loop_start()
    try:
        await eventually(lambda: device.connack, timeout=10)
    finally:
        device.client.loop_stop()
    assert not device.client.is_connected()
    return device.connack[0]


async def test_mqtt_without_credentials_or_with_a_wrong_password_is_refused(
    mqtt_device, mqtt_port
) -> None:  # type: ignore[no-untyped-def]
    registered = await mqtt_device()
    anonymous = MqttDevice(unique_id("mqtt"), mqtt_port)
    anonymous.client.username_pw_set(None, None)
    wrong = MqttDevice(registered.device_id, mqtt_port, password=new_secret("smd_"))
    other_id = MqttDevice(
        registered.device_id, mqtt_port, registered.password, client_id=unique_id("mqtt")
    )

    for device in (anonymous, wrong, other_id):
        assert (await _refused_connack(device)) in ("Not authorized", "Bad user name or password")


async def test_an_mqtt_device_may_speak_only_for_itself(actors, js, mqtt_device, sessions) -> None:  # type: ignore[no-untyped-def]
    a, b = await mqtt_device(), await mqtt_device()
    own = await a.send("telemetry", {"power_w": 5.0})
    await facts(js, a.device_id, lambda fs: any(f.cause_event_id == own.id for f in fs))

    for topic in (subjects.commands(b.device_id), "commands.>", ">"):
        assert await a.subscribe(topic) != ["Granted QoS 1"], topic
    forged = m.make_event(b.device_id, "telemetry", {"power_w": 9999.0})
    a.client.publish(subjects.mqtt_topic(forged.nats_subject), m.encode(forged), qos=1)
    # The server drops it (or closes the connection): either way nothing is stored, and a
    # later event of A's own still lands behind it.
    later = m.make_event(a.device_id, "telemetry", {"power_w": 6.0})
    a.client.publish(subjects.mqtt_topic(later.nats_subject), m.encode(later), qos=1)
    await eventually(
        lambda: _stored(js, later.nats_subject, later.id) if a.client.is_connected() else True
    )

    with pytest.raises(nats.js.errors.NotFoundError):
        await js.get_last_msg(subjects.EVENTS_STREAM, subjects.stored_filter(forged.nats_subject))
    async with sessions() as session:
        assert await session.get(DeviceState, b.device_id) is None  # B never heard of


async def _stored(js, subject: str, event_id: str) -> bool:  # type: ignore[no-untyped-def]
    try:
        stored = await js.get_last_msg(subjects.EVENTS_STREAM, subjects.stored_filter(subject))
    except nats.js.errors.NotFoundError:
        return False
    return m.cloud_event_decoder.decode(stored.data).id == event_id


async def test_rotated_credentials_close_a_live_mqtt_connection(mqtt_device, js, sessions) -> None:  # type: ignore[no-untyped-def]
    device = await mqtt_device()
    async with sessions.begin() as session:
        row = await session.get(BusCredential, device.device_id)
        row.secret_hash, row.generation = digest(new_secret("smd_")), row.generation + 1
    fact = m.ChangeFact(
        what="credentials", id=device.device_id, change="rotated", actor="user:test",
        correlation_id=unique_id("corr"), time=m.now(),
    )  # fmt: skip
    await bus.publish(js, subjects.credentials_changed(device.device_id), fact, msg_id=m.new_id())

    # Closed within 10 s, and its reconnects with the old password are refused.
    await eventually(lambda: not device.client.is_connected(), timeout=10)
    await eventually(lambda: device.connack[-1] == "Not authorized", timeout=10)
    assert not device.client.is_connected()
