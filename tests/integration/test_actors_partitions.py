"""Actors partitioned across processes: take-over, joining, fencing, and the upgrade.

Each test has a nats-server of its own with 4 (or 6) partitions of device events, and real
actors processes; every device's `version` must move by exactly its number of events.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NotFoundError
from sqlalchemy import select

from libs import bus, replay, subjects
from libs import messages as m
from libs.db.models import ActorPartitionFence
from libs.lease import ACTOR_BUCKET
from services.actors.partitions import partition_of
from tests.helpers import eventually, unique_id
from tests.integration.test_actors import register, states
from tests.outage import PrivateNats
from tests.processes import Service

TAKEOVER_S = 5.0


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[PrivateNats]:
    server = PrivateNats(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        assert server.proc is not None
        server.proc.terminate()
        server.proc.wait(10)


@pytest.fixture
async def pjs(private_nats: PrivateNats) -> AsyncIterator[JetStreamContext]:
    nc = await bus.connect(private_nats.url, "tests")
    try:
        yield nc.jetstream()
    finally:
        await nc.drain()


class Actors:
    """Actors processes on the private bus, all with the same partition count."""

    def __init__(self, env: dict[str, str], log_dir: Path, partitions: int) -> None:
        self.env = {
            **env,
            "SMARTHOME_ACTOR_PARTITIONS": str(partitions),
            # No presence timeouts while the test holds events back: every version is an event.
            "SMARTHOME_HEARTBEAT_TIMEOUT": "3600",
        }
        self.log_dir = log_dir
        self.started: list[Service] = []

    def start(self) -> Service:
        service = Service("services.actors", self.env, self.log_dir)
        self.started.append(service)
        return service.start()

    async def start_many(self, count: int) -> list[Service]:
        """Started side by side: a process's start-up is seconds on a loaded machine."""
        return list(await asyncio.gather(*(asyncio.to_thread(self.start) for _ in range(count))))

    def stop_all(self) -> None:
        for service in self.started:
            if service.proc is not None and service.proc.poll() is None:
                os.kill(service.proc.pid, signal.SIGCONT)  # a stopped one cannot stop
            assert service.stop() in (0, -9), service.tail()


@pytest.fixture
def actors(service_env, private_nats: PrivateNats, tmp_path: Path) -> Iterator:  # type: ignore[no-untyped-def]
    made: list[Actors] = []

    def make(partitions: int) -> Actors:
        made.append(Actors({**service_env, "NATS_URL": private_nats.url}, tmp_path, partitions))
        return made[-1]

    yield make
    for group in made:
        group.stop_all()


def pid_of(owner: str) -> int:
    return int(owner.rpartition(":")[2])


async def holders(js: JetStreamContext, partitions: int) -> dict[int, int]:
    """Each held partition's holder, by pid (from the leases in KV)."""
    try:
        kv = await js.key_value(ACTOR_BUCKET)
    except NotFoundError:
        return {}
    found = {}
    for index in range(partitions):
        try:
            entry = await kv.get(bus.actors_durable(index))
        except KeyNotFoundError:
            continue
        if entry.value:
            found[index] = pid_of(entry.value.decode())
    return found


async def fences(sessions, partitions: int) -> dict[int, int]:  # type: ignore[no-untyped-def]
    """Each partition's claim in the database, by holder pid."""
    async with sessions() as session:
        rows = await session.execute(
            select(ActorPartitionFence.partition, ActorPartitionFence.holder).where(
                ActorPartitionFence.partition < partitions
            )
        )
        return {p: pid_of(h) for p, h in rows if h}


def devices_in(partitions: set[int], count: int, per_partition: int, prefix: str) -> list[str]:
    """Device ids whose events land in `partitions` (of `count`), `per_partition` each."""
    found: dict[int, list[str]] = {p: [] for p in partitions}
    while any(len(d) < per_partition for d in found.values()):
        device = unique_id(prefix)
        p = partition_of(device, count)
        if p in found and len(found[p]) < per_partition:
            found[p].append(device)
    return [d for ds in found.values() for d in ds]


async def publish_round(js: JetStreamContext, devices: list[str], n: int) -> None:
    futures = []
    for device in devices:
        event = m.make_event(device, "telemetry", {"n": n})
        body = msgspec.json.encode(event)
        futures.append(
            await js.publish_async(event.nats_subject, body, headers={bus.MSG_ID: event.id})
        )
    for f in futures:
        await f


async def publish_until(
    js: JetStreamContext, devices: list[str], until: asyncio.Event, then: int = 5
) -> int:
    """Rounds of one event per device, spread over time, until `until` is set and `then`
    more: the load the faults happen under. Returns how many rounds (events per device)."""
    n = 0
    while not until.is_set() or then > 0:
        if until.is_set():
            then -= 1
        await publish_round(js, devices, n)
        n += 1
        await asyncio.sleep(0.05)
    return n


async def all_applied(sessions, devices: list[str], per_device: int) -> dict:  # type: ignore[no-untyped-def]
    async def done():  # type: ignore[no-untyped-def]
        found = await states(sessions, devices)
        ok = len(found) == len(devices) and all(s.version >= per_device for s in found.values())
        return found if ok else None

    return await eventually(done, timeout=60)


def assert_each_applied_once(final: dict, devices: list[str], per_device: int) -> None:
    assert {d: s.version for d, s in final.items()} == dict.fromkeys(devices, per_device)
    assert all(s.attributes == {"n": per_device - 1} for s in final.values())


async def some_applied(sessions, devices: list[str], at_least: int) -> None:  # type: ignore[no-untyped-def]
    async def enough() -> int:
        total = sum(s.version for s in (await states(sessions, devices)).values())
        return total if total >= at_least else 0

    await eventually(enough, timeout=30)


async def shared(js: JetStreamContext, partitions: int, pids: set[int], each: int) -> dict:
    """Until every partition is held, by `pids` only, each holding `each` at least."""

    async def balanced():  # type: ignore[no-untyped-def]
        held = await holders(js, partitions)
        counts = {pid: list(held.values()).count(pid) for pid in pids}
        ok = len(held) == partitions and set(held.values()) <= pids
        return held if ok and min(counts.values()) >= each else None

    return await eventually(balanced, timeout=20)


async def test_stored_events_carry_the_partition_the_actors_compute(pjs, actors) -> None:  # type: ignore[no-untyped-def]
    await bus.ensure_streams(pjs, partitions=4)
    devices = [unique_id("hash") for _ in range(16)]
    await publish_round(pjs, devices, 0)
    for device in devices:
        stored_filter = subjects.stored_filter(subjects.device_events(device, "telemetry"))
        stored = await pjs.get_last_msg(subjects.EVENTS_STREAM, stored_filter)
        assert stored.subject == f"events.~.{partition_of(device, 4)}.{device}.telemetry"


async def fault_under_load(pjs, sessions, group: Actors, partitions: int, fault) -> None:  # type: ignore[no-untyped-def]
    """Two actors processes share `partitions` while events flow; `fault(first, second)`
    happens under that load and returns once its outcome is seen. Then every device's events
    must each have been applied once."""
    await bus.ensure_streams(pjs, partitions=partitions)
    devices = [unique_id("fault") for _ in range(24)]
    await register(sessions, *devices)
    first, second = await group.start_many(2)
    assert first.proc is not None and second.proc is not None
    await shared(pjs, partitions, {first.proc.pid, second.proc.pid}, partitions // 2)

    over = asyncio.Event()
    publishing = asyncio.create_task(publish_until(pjs, devices, over))
    try:
        await some_applied(sessions, devices, 100)
        await fault(first, second)
    except BaseException:
        publishing.cancel()
        raise
    finally:
        over.set()
    rounds = await publishing
    final = await all_applied(sessions, devices, rounds)
    assert_each_applied_once(final, devices, rounds)


async def test_killed_actor_process_partitions_are_taken_over_and_each_event_applied_once(
    pjs, sessions, actors
) -> None:  # type: ignore[no-untyped-def]
    took = 0.0

    async def kill_first(first: Service, second: Service) -> None:
        nonlocal took
        survivor = second.proc.pid  # type: ignore[union-attr]
        first.kill9()
        killed_at = time.monotonic()

        async def taken_over() -> bool:
            held, claimed = await holders(pjs, 4), await fences(sessions, 4)
            return set(held.values()) == {survivor} == set(claimed.values()) and len(held) == 4

        await eventually(taken_over, timeout=15)
        took = time.monotonic() - killed_at

    await fault_under_load(pjs, sessions, actors(4), 4, kill_first)
    print(f"take-over of the killed process's partitions: {took:.2f} s")
    assert took < TAKEOVER_S, f"taken over in {took:.2f} s"


async def test_a_joining_actor_process_takes_its_share_without_stopping_the_others(
    pjs, sessions, actors
) -> None:  # type: ignore[no-untyped-def]
    # 6 partitions: with 3 processes the share is 2, so each of the first two hands one over.
    group = actors(6)

    async def third_joins(first: Service, second: Service) -> None:
        third = await asyncio.to_thread(group.start)
        pids = {s.proc.pid for s in (first, second, third)}  # type: ignore[union-attr]
        await shared(pjs, 6, pids, 2)

    await fault_under_load(pjs, sessions, group, 6, third_joins)
    # Nobody stopped: the first two still run and still work partitions.
    first, second = group.started[:2]
    assert first.proc.poll() is None and second.proc.poll() is None  # type: ignore[union-attr]


async def test_a_paused_holder_s_late_write_is_refused_by_the_fence(pjs, sessions, actors) -> None:  # type: ignore[no-untyped-def]
    await bus.ensure_streams(pjs, partitions=4)
    group = actors(4)
    first, second = await group.start_many(2)
    assert first.proc is not None and second.proc is not None
    held = await shared(pjs, 4, {first.proc.pid, second.proc.pid}, 2)
    paused_pid, other_pid = first.proc.pid, second.proc.pid
    mine = {p for p, pid in held.items() if pid == paused_pid}
    devices = devices_in(mine, 4, 3, "fence")
    await register(sessions, *devices)
    await publish_round(pjs, devices, 0)
    await some_applied(sessions, devices, len(devices))

    os.kill(paused_pid, signal.SIGSTOP)
    try:
        # Delivered to the paused holder's open pull requests, handled when it wakes.
        await publish_round(pjs, devices, 1)

        async def claimed_by_the_other() -> bool:
            claims = await fences(sessions, 4)
            return all(claims.get(p) == other_pid for p in mine)

        await eventually(claimed_by_the_other, timeout=15)
    finally:
        os.kill(paused_pid, signal.SIGCONT)
    await eventually(lambda: "late write refused" in first.tail(20_000), timeout=15)
    for n in range(2, 10):
        await publish_round(pjs, devices, n)
    final = await all_applied(sessions, devices, 10)
    assert_each_applied_once(final, devices, 10)
    assert first.proc.poll() is None, first.tail()


async def test_an_upgrade_drains_the_legacy_consumer_then_works_partitions(
    pjs, sessions, actors
) -> None:  # type: ignore[no-untyped-def]
    # The bus as an install before partitions made it: every event on `events.>`, stored as
    # published, read by the one `actors` consumer, which holds some un-acked.
    for config in bus.STREAMS:
        await pjs.add_stream(config)
    before = dataclasses.replace(bus.legacy_actors_consumer(), filter_subject=subjects.EVENTS_ALL)
    await pjs.add_consumer(subjects.EVENTS_STREAM, before)
    devices = [unique_id("upgrade") for _ in range(20)]
    await register(sessions, *devices)
    for n in range(10):
        await publish_round(pjs, devices, n)
    old = await pjs.pull_subscribe_bind(bus.LEGACY_ACTORS_DURABLE, stream=subjects.EVENTS_STREAM)
    taken = await old.fetch(50, timeout=5)
    await old.unsubscribe()
    assert taken and all(msg.subject.count(".") == 2 for msg in taken)

    await bus.ensure_streams(pjs, partitions=4)  # the new gateway
    for n in range(10, 20):
        await publish_round(pjs, devices, n)
    group = actors(4)
    await group.start_many(2)

    final = await all_applied(sessions, devices, 20)
    assert_each_applied_once(final, devices, 20)
    with pytest.raises(NotFoundError):
        await pjs.consumer_info(subjects.EVENTS_STREAM, bus.LEGACY_ACTORS_DURABLE)
    assert sum("drained and deleted the legacy" in s.tail(50_000) for s in group.started) == 1


async def test_an_install_storing_the_partition_last_keeps_its_layout(
    pjs, sessions, actors
) -> None:  # type: ignore[no-untyped-def]
    """An install from before stop 21 stores `events.<device>.<type>.<partition>`: the new
    gateway keeps that layout (no migration), and the actors, the replays and the filters
    follow it."""
    for config in bus.STREAMS:
        if config.name == subjects.EVENTS_STREAM:
            config = bus.partitioned_events(config, 4, first=False)
        await pjs.add_stream(config)
    for partition in range(4):
        await pjs.add_consumer(subjects.EVENTS_STREAM, bus.actors_consumer(partition, False))
    devices = [unique_id("before") for _ in range(12)]
    await register(sessions, *devices)
    await publish_round(pjs, devices, 0)

    await bus.ensure_streams(pjs, partitions=4)  # the new gateway
    assert not await bus.partition_first(pjs)
    info = await pjs.consumer_info(subjects.EVENTS_STREAM, bus.actors_durable(2))
    assert info.config.filter_subject == "events.*.*.2"
    for n in range(1, 5):
        await publish_round(pjs, devices, n)
    await actors(4).start_many(1)
    final = await all_applied(sessions, devices, 5)
    assert_each_applied_once(final, devices, 5)

    device = devices[0]
    stored = await pjs.get_last_msg(
        subjects.EVENTS_STREAM, await bus.stored_filter(pjs, f"events.{device}.telemetry")
    )
    assert stored.subject == f"events.{device}.telemetry.{partition_of(device, 4)}"
    page = await replay.read(pjs, subjects.EVENTS_STREAM, f"events.{device}.>", limit=10)
    assert [s.subject for s in page.messages] == [f"events.{device}.telemetry"] * 5
