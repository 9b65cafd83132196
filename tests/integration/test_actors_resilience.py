"""Resilience: kill -9 the actors mid-stream; nothing lost, nothing applied twice.

Its own module: the other actors tests keep a worker running for their whole module.
"""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from libs import bus, subjects
from libs import messages as m
from libs.db.engine import make_engine, make_sessionmaker
from libs.db.migrate import upgrade
from libs.settings import async_database_url
from services.actors.partitions import partition_of
from tests.helpers import eventually, unique_id
from tests.integration.test_actors import register, send, states
from tests.outage import PrivatePostgres, postgres_bin
from tests.processes import Service
from tests.proxy import Relay

PER_DEVICE = 100


def quiet_env(service_env: dict[str, str]) -> dict[str, str]:
    """No presence timeouts while the test holds events back: every version is an event."""
    return {**service_env, "SMARTHOME_HEARTBEAT_TIMEOUT": "3600"}


async def publish_all(js, devices: list[str]) -> None:  # type: ignore[no-untyped-def]
    futures = []
    for n in range(PER_DEVICE):
        for device in devices:
            event = m.make_event(device, "telemetry", {"n": n})
            body = msgspec.json.encode(event)
            futures.append(
                await js.publish_async(event.nats_subject, body, headers={bus.MSG_ID: event.id})
            )
    for f in futures:
        await f


async def wait_until_some_applied(sessions, devices: list[str]) -> None:  # type: ignore[no-untyped-def]
    async def applied_some() -> int:
        total = sum(s.version for s in (await states(sessions, devices)).values())
        return total if total >= 200 else 0

    await eventually(applied_some, timeout=30)


async def wait_until_all_applied(sessions, devices: list[str]) -> dict:  # type: ignore[no-untyped-def]
    async def all_applied():  # type: ignore[no-untyped-def]
        found = await states(sessions, devices)
        done = len(found) == len(devices) and all(s.version >= PER_DEVICE for s in found.values())
        return found if done else None

    return await eventually(all_applied, timeout=60)


def assert_each_applied_once(final: dict, devices: list[str]) -> None:
    assert {d: s.version for d, s in final.items()} == dict.fromkeys(devices, PER_DEVICE)
    assert all(s.attributes == {"n": PER_DEVICE - 1} for s in final.values())


async def test_killed_actor_applies_every_event_once(service_env, data_dir, js, sessions) -> None:  # type: ignore[no-untyped-def]
    devices = [unique_id("kill") for _ in range(20)]
    await register(sessions, *devices)
    worker = Service("services.actors", quiet_env(service_env), data_dir).start()
    try:
        await publish_all(js, devices)
        await wait_until_some_applied(sessions, devices)
        worker.kill9()
        worker.start()
        final = await wait_until_all_applied(sessions, devices)
    finally:
        code = worker.stop()
    assert code == 0, worker.tail()
    assert_each_applied_once(final, devices)


async def test_standby_worker_takes_over_when_owner_is_killed(
    service_env, data_dir, js, sessions
) -> None:  # type: ignore[no-untyped-def]
    devices = [unique_id("fail") for _ in range(20)]
    await register(sessions, *devices)
    owner = Service("services.actors", quiet_env(service_env), data_dir).start()
    await eventually(lambda: "acquired" in owner.log(), timeout=10)
    standby = Service("services.actors", quiet_env(service_env), data_dir).start()
    try:
        await eventually(lambda: "standing by" in standby.log(), timeout=10)
        await publish_all(js, devices)
        await wait_until_some_applied(sessions, devices)
        owner.kill9()
        final = await wait_until_all_applied(sessions, devices)
        # The owner may have applied them all before it died: the take-over is awaited.
        await eventually(lambda: "acquired" in standby.log(), timeout=15)
    finally:
        code = standby.stop()
    assert code == 0, standby.tail()
    assert_each_applied_once(final, devices)


def durable_of(device: str) -> str:
    """The actors' consumer of the device's partition (the session's bus: the default count)."""
    return bus.actors_durable(partition_of(device, bus.DEFAULT_PARTITIONS))


async def drained(js, durable: str) -> bool:  # type: ignore[no-untyped-def]
    info = await js.consumer_info(subjects.EVENTS_STREAM, durable)
    return info.num_pending == 0 and info.num_ack_pending == 0


async def test_a_batch_left_unacked_by_a_dead_worker_is_applied_before_newer_events(
    service_env, data_dir, js, sessions
) -> None:  # type: ignore[no-untyped-def]
    device = unique_id("inflight")
    await register(sessions, device)
    worker = Service("services.actors", quiet_env(service_env), data_dir).start()
    try:  # (stopped whatever fails: a worker left running would hold the next test's leases)
        durable = durable_of(device)
        await eventually(lambda: drained(js, durable), timeout=30)  # what other tests left
        assert worker.stop() == 0, worker.tail()
        for n in range(3):
            await send(js, device, "telemetry", {"n": n})
        # A worker fetches these three and dies before its ack: far fewer than a full batch,
        # so the bus goes on delivering newer events while these wait for their ack_wait.
        dead = await js.pull_subscribe_bind(durable, stream=subjects.EVENTS_STREAM)
        taken = await dead.fetch(3, timeout=5)
        await dead.unsubscribe()
        assert len(taken) == 3

        worker.start()
        await send(js, device, "telemetry", {"n": 3})

        async def all_four():  # type: ignore[no-untyped-def]
            s = (await states(sessions, [device])).get(device)
            return s if s is not None and s.version >= 4 else None

        final = await eventually(all_four, timeout=20)
    finally:
        code = worker.stop()
    assert code == 0, worker.tail()
    assert (final.version, final.attributes) == (4, {"n": 3})


@pytest.mark.skipif(postgres_bin() is None, reason="needs PostgreSQL server binaries to stop one")
async def test_a_worker_stopped_while_the_database_is_down_loses_nothing(
    tmp_path, service_env, js
) -> None:  # type: ignore[no-untyped-def]
    pg = PrivatePostgres()
    try:
        pg.start()
        await asyncio.to_thread(upgrade, async_database_url(pg.url))
        engine = make_engine(async_database_url(pg.url))
        sessions = make_sessionmaker(engine)
        devices = [unique_id("stopdown") for _ in range(20)]
        await register(sessions, *devices)
        env = {**quiet_env(service_env), "DATABASE_URL": pg.url}
        env.pop("REDIS_URL", None)
        worker = Service("services.actors", env, tmp_path).start()
        try:  # (stopped whatever fails: a worker left running would hold the next's leases)
            for device in devices:  # known to the worker: deciding needs no database read
                await send(js, device, "telemetry", {"n": -1})
            await eventually(lambda: all_at_version(sessions, devices, 1), timeout=20)
            pg.stop()
            # More than the bus hands out un-acked: the worker waits for its writer to make
            # room.
            await publish_all(js, devices)
            await eventually(lambda: "state write failed, retrying" in worker.log(), timeout=20)
            assert worker.stop() == 0, worker.tail()  # not killed after the grace period

            pg.start()
            worker.start()
            await eventually(lambda: all_at_version(sessions, devices, PER_DEVICE + 1), timeout=60)
            final = await states(sessions, devices)
        finally:
            code = worker.stop()
            await engine.dispose()
        assert code == 0, worker.tail()
        assert {d: s.version for d, s in final.items()} == dict.fromkeys(devices, PER_DEVICE + 1)
        assert all(s.attributes == {"n": PER_DEVICE - 1} for s in final.values())
    finally:
        pg.remove()


async def all_at_version(sessions, devices: list[str], version: int) -> bool:  # type: ignore[no-untyped-def]
    found = await states(sessions, devices)
    return len(found) == len(devices) and all(s.version >= version for s in found.values())


async def test_events_lost_with_a_connection_are_applied_once_in_order(
    service_env, data_dir, nats_url, js, sessions
) -> None:  # type: ignore[no-untyped-def]
    """Events the bus handed out on a connection that died before they arrived are applied
    before the newer ones of the next connection (whose ack would ack them unseen)."""
    device = unique_id("lost")
    await register(sessions, device)
    relay = Relay(int(nats_url.rsplit(":", 1)[1]))
    worker = Service(
        "services.actors", {**quiet_env(service_env), "NATS_URL": relay.url}, data_dir
    ).start()

    async def publish(first: int, count: int) -> int:
        for n in range(first, first + count):
            event = m.make_event(device, "telemetry", {"n": n})
            ack = await bus.publish(js, event.nats_subject, event, msg_id=event.id)
        return ack.seq

    async def version_is(version: int):  # type: ignore[no-untyped-def]
        found = (await states(sessions, [device])).get(device)
        assert found is not None, "no state yet"
        assert found.version >= version, (found.version, found.attributes)
        return found

    try:
        await publish(0, 5)
        await eventually(lambda: version_is(5), timeout=15)
        relay.drop()
        last = await publish(5, 5)
        durable = durable_of(device)
        await eventually(lambda: _delivered(js, durable, last), timeout=15)
        relay.cut()
        await publish(10, 5)
        final = await eventually(lambda: version_is(15), timeout=30)
    finally:
        code = worker.stop()
        relay.close()
    assert code == 0, worker.tail()
    assert (final.version, final.attributes) == (15, {"n": 14})


async def _delivered(js, durable: str, last_seq: int) -> bool:  # type: ignore[no-untyped-def]
    info = await js.consumer_info(subjects.EVENTS_STREAM, durable)
    return info.delivered.stream_seq >= last_seq
