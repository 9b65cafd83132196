"""The actors applied to a real nats-server and database, as separate processes."""

from __future__ import annotations

import json

import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy
from sqlalchemy import select

from libs import bus, commands, subjects
from libs import messages as m
from libs.db.models import CommandRecord, Device, DeviceState
from tests.helpers import eventually, unique_id
from tests.processes import Service


@pytest.fixture(scope="module")
def actors(service_env, data_dir):  # type: ignore[no-untyped-def]
    service = Service("services.actors", service_env, data_dir).start()
    yield service
    assert service.stop() == 0, service.tail()


async def register(
    sessions, *device_ids: str, enabled: bool = True, lifecycle: str = "active"
) -> None:  # type: ignore[no-untyped-def]
    async with sessions.begin() as session:
        for device_id in device_ids:
            session.add(
                Device(
                    id=device_id,
                    name=device_id,
                    kind="sensor",
                    enabled=enabled,
                    lifecycle=lifecycle,
                )
            )


async def states(sessions, device_ids: list[str]) -> dict[str, DeviceState]:  # type: ignore[no-untyped-def]
    async with sessions() as session:
        rows = await session.scalars(
            select(DeviceState).where(DeviceState.device_id.in_(device_ids))
        )
        return {r.device_id: r for r in rows}


async def send(js, device_id: str, event_type: str, data: dict | None = None) -> m.CloudEvent:  # type: ignore[no-untyped-def]
    event = m.make_event(device_id, event_type, data)
    await bus.publish(js, event.nats_subject, event, msg_id=event.id)
    return event


async def test_telemetry_updates_state_and_version(actors, js, sessions) -> None:  # type: ignore[no-untyped-def]
    device = unique_id()
    await register(sessions, device)
    await send(js, device, "telemetry", {"power_w": 60.0, "on": True})
    await send(js, device, "telemetry", {"power_w": 0.0, "on": False})

    async def applied():  # type: ignore[no-untyped-def]
        s = (await states(sessions, [device])).get(device)
        return s if s and s.version == 2 else None

    state = await eventually(applied)
    assert state.state == "off"
    assert state.connection == "online"
    assert state.attributes == {"power_w": 0.0, "on": False}


async def test_state_fact_published_only_on_change(actors, js, sessions, nc) -> None:  # type: ignore[no-untyped-def]
    device = unique_id()
    await register(sessions, device)
    facts: list[m.DeviceStateFact] = []

    async def collect(msg) -> None:  # type: ignore[no-untyped-def]
        facts.append(m.state_fact_decoder.decode(msg.data))

    sub = await nc.subscribe(subjects.device_state(device), cb=collect)
    for _ in range(3):
        await send(js, device, "telemetry", {"power_w": 5.0})
    await send(js, device, "telemetry", {"power_w": 6.0})
    await eventually(lambda: len(facts) >= 2)

    async def committed() -> m.DeviceSnapshot | None:
        # A fact may reach the bus while its state is being written.
        s = (await states(sessions, [device])).get(device)
        return s if s is not None and s.version >= 2 else None

    s = await eventually(committed)
    await sub.unsubscribe()
    # Three identical readings are one change; the fourth reading is the second.
    assert s.version == 2
    assert [f.version for f in facts] == [1, 2]
    assert facts[-1].attributes == {"power_w": 6.0}


async def test_malformed_event_goes_to_dead_letter_and_worker_goes_on(actors, js, sessions) -> None:  # type: ignore[no-untyped-def]
    device = unique_id()
    await register(sessions, device)
    subject = subjects.device_events(device, "telemetry")
    await js.publish(subject, b'{"id": "x", "broken json')
    await js.publish(
        subject,
        json.dumps(
            {
                "id": "y",
                "source": "s",
                "type": "telemetry",
                "subject": device,
                "specversion": "1.0",
                "data": {"power_w": [1, 2]},
            }
        ).encode(),
    )
    naive = {"id": "z", "source": "s", "type": "telemetry", "subject": device}
    naive |= {"specversion": "1.0", "time": "2026-01-01T10:00:00"}  # no zone: means nothing
    await js.publish(subject, json.dumps(naive).encode())
    await send(js, device, "telemetry", {"power_w": 7.0})

    async def applied():  # type: ignore[no-untyped-def]
        s = (await states(sessions, [device])).get(device)
        return s if s and s.attributes.get("power_w") == 7.0 else None

    await eventually(applied)
    sub = await js.subscribe(
        subjects.deadletter(subject),
        ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
    )
    letters = [await sub.next_msg(timeout=5) for _ in range(3)]
    await sub.unsubscribe()
    # By what is wrong, not in order: a malformed envelope is refused as it is read, an
    # attribute that is not flat when it is applied.
    reasons = {msg.data: msg.headers[bus.DL_REASON] for msg in letters}
    assert "invalid event" in reasons[b'{"id": "x", "broken json']
    assert "$.data.power_w" in next(r for d, r in reasons.items() if b'"id": "y"' in d)
    assert "timezone component - at `$.time`" in next(
        r for d, r in reasons.items() if b'"id": "z"' in d
    )
    assert all(msg.headers[bus.DL_CONSUMER].startswith("actors-") for msg in letters)


@pytest.mark.parametrize(
    ("registry", "reason"),
    [
        ({"enabled": False}, "device is disconnected by an administrator"),
        ({"lifecycle": "pending"}, "device is waiting for an administrator to approve it"),
        ({"lifecycle": "rejected"}, "device was rejected by an administrator"),
    ],
    ids=["disconnected", "pending", "rejected"],
)
async def test_events_of_a_device_that_may_not_report_are_rejected_with_reason(
    actors, js, sessions, nc, registry: dict, reason: str
) -> None:  # type: ignore[no-untyped-def]
    device = unique_id()
    await register(sessions, device, **registry)
    got: list[m.RejectedFact] = []

    async def collect(msg) -> None:  # type: ignore[no-untyped-def]
        got.append(m.rejected_fact_decoder.decode(msg.data))

    sub = await nc.subscribe(subjects.device_rejected(device), cb=collect)
    await send(js, device, "telemetry", {"power_w": 1.0})
    await eventually(lambda: got)
    await sub.unsubscribe()
    assert got[0].reason == reason
    assert device not in await states(sessions, [device])


async def test_a_disconnect_is_obeyed_from_its_fact(actors, js, sessions, nc) -> None:  # type: ignore[no-untyped-def]
    """The gateway's outbox publishes a registry fact once its change is committed: the
    actors take the fact's word for a device they know (no read of the database per event),
    and a device's events are refused from its disconnect on."""
    device = unique_id()
    await register(sessions, device)
    await send(js, device, "telemetry", {"n": 0})
    await eventually(lambda: _version(sessions, device, 1))
    refused: list[m.RejectedFact] = []

    async def collect(msg) -> None:  # type: ignore[no-untyped-def]
        refused.append(m.rejected_fact_decoder.decode(msg.data))

    sub = await nc.subscribe(subjects.device_rejected(device), cb=collect)
    async with sessions.begin() as session:
        row = await session.get(Device, device)
        row.enabled = False
    fact = m.RegistryFact(
        device_id=device,
        change="disconnected",
        actor="user:test",
        correlation_id=unique_id("corr"),
        time=m.now(),
        device={"id": device, "kind": "sensor", "lifecycle": "active", "enabled": False},
    )
    await bus.publish(js, subjects.device_registry(device), fact, msg_id=m.new_id())
    await send(js, device, "telemetry", {"n": 1})
    await send(js, device, "telemetry", {"n": 2})
    await eventually(lambda: len(refused) == 2, timeout=10)
    await sub.unsubscribe()
    assert all("disconnected" in r.reason for r in refused)
    assert (await states(sessions, [device]))[device].attributes == {"n": 0}


async def _version(sessions, device_id: str, version: int) -> bool:  # type: ignore[no-untyped-def]
    found = (await states(sessions, [device_id])).get(device_id)
    return found is not None and found.version == version


async def test_silent_device_goes_offline_after_heartbeat_timeout(actors, js, sessions) -> None:  # type: ignore[no-untyped-def]
    device = unique_id()
    await register(sessions, device)
    await send(js, device, "hello")

    async def connection():  # type: ignore[no-untyped-def]
        s = (await states(sessions, [device])).get(device)
        return s.connection if s else None

    await eventually(lambda: _eq(connection(), "online"))
    # The test settings use a 2 s heartbeat timeout.
    await eventually(lambda: _eq(connection(), "offline"), timeout=15)


async def _eq(value, expected) -> bool:  # type: ignore[no-untyped-def]
    return (await value) == expected


async def test_deleted_device_leaves_no_state_for_a_new_one(actors, js, sessions, nc) -> None:  # type: ignore[no-untyped-def]
    device = unique_id()
    await register(sessions, device)
    await send(js, device, "telemetry", {"power_w": 60.0})
    await eventually(lambda: _has_state(sessions, device))
    async with sessions.begin() as session:
        await session.delete(await session.get(Device, device))
    fact = m.RegistryFact(
        device_id=device, change="deleted", actor="user:test", correlation_id="c", time=m.now()
    )
    await bus.publish(js, subjects.device_registry(device), fact)
    await eventually(lambda: _no_state(sessions, device))


async def _has_state(sessions, device: str) -> bool:  # type: ignore[no-untyped-def]
    return device in await states(sessions, [device])


async def _no_state(sessions, device: str) -> bool:  # type: ignore[no-untyped-def]
    return device not in await states(sessions, [device])


async def command_row(sessions, command_id: str) -> CommandRecord | None:  # type: ignore[no-untyped-def]
    async with sessions() as session:
        return await session.get(CommandRecord, command_id)


async def test_a_status_that_comes_before_the_commands_record_is_kept(actors, js, sessions) -> None:  # type: ignore[no-untyped-def]
    """A rule publishes its command first and records it after: the device may answer in
    between. Its status waits in a stand-in row, which the record fills in."""
    light = unique_id("light")
    await register(sessions, light)
    command = commands.new(
        device_id=light,
        action="turn_off",
        params={},
        expires_s=60,
        issued_by="rule:r1",
        correlation_id="episode-1",
    )
    await send(js, light, "command_status", {"command_id": command.id, "status": "done"})
    await eventually(lambda: command_row(sessions, command.id), timeout=10)

    await commands.record(sessions, command)

    row = await command_row(sessions, command.id)
    assert row is not None
    assert (row.status, row.action, row.issued_by) == ("done", "turn_off", "rule:r1")
    assert row.correlation_id == "episode-1"
