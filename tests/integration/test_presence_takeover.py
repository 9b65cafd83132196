"""Presence is judged by the holder of a device's partition, from its memory: a device that
went silent under a holder that died goes offline under the next one (read once when it
takes the partition over), and a scan with nothing due reads no device state at all.

Its own module: its actors processes and in-process partitions must hold every partition.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from sqlalchemy import event

from libs import bus, subjects
from libs import messages as m
from libs.cache import make_cache
from services.actors.partitions import ActorPartitions, partition_of
from services.actors.presence import scan_once
from tests.helpers import eventually, unique_id
from tests.integration.test_actors import register, send, states
from tests.processes import Service

TIMEOUT_S = 8.0  # longer than a dead holder's leases take to expire (3 s)


async def connection(sessions, device: str) -> str | None:  # type: ignore[no-untyped-def]
    state = (await states(sessions, [device])).get(device)
    return state.connection if state is not None else None


async def acked(js, device: str) -> bool:  # type: ignore[no-untyped-def]
    """Every event of the device's partition acked: its next holder is sent none of them."""
    durable = bus.actors_durable(partition_of(device, bus.DEFAULT_PARTITIONS))
    info = await js.consumer_info(subjects.EVENTS_STREAM, durable)
    return info.num_pending == 0 and info.num_ack_pending == 0


async def test_a_device_silent_under_a_dead_holder_goes_offline_under_the_next(  # type: ignore[no-untyped-def]
    service_env, data_dir, js, sessions
) -> None:
    env = {**service_env, "SMARTHOME_HEARTBEAT_TIMEOUT": str(TIMEOUT_S)}
    device = unique_id("silent")
    await register(sessions, device)
    first = Service("services.actors", env, data_dir).start()
    second = Service("services.actors", env, data_dir)
    try:
        await send(js, device, "heartbeat")
        await eventually(lambda: _is(connection(sessions, device), "online"), timeout=10)
        await eventually(lambda: acked(js, device), timeout=10)
        first.kill9()  # before its timeout: the device is online, and silent from now on
        assert await connection(sessions, device) == "online"

        second.start()  # sent none of the device's events: only its take-over read knows it
        await eventually(lambda: _is(connection(sessions, device), "offline"), timeout=30)
    finally:
        first.stop()
        code = second.stop()
    assert code == 0, second.tail()


async def test_a_scan_with_nothing_due_reads_no_device_state(  # type: ignore[no-untyped-def]
    nc, js, sessions, redis_url
) -> None:
    device = unique_id("due")
    await register(sessions, device)
    cache = make_cache(redis_url)
    partitions = ActorPartitions(nc, sessions, cache, bus.DEFAULT_PARTITIONS, TIMEOUT_S)
    stop = asyncio.Event()
    task = asyncio.create_task(partitions.run(stop))
    statements: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
        statements.append(statement)

    engine = sessions.kw["bind"].sync_engine
    try:
        await eventually(
            lambda: len(partitions.workers) == partitions.count and partitions.bound.is_set(),
            timeout=30,
        )
        await send(js, device, "heartbeat")
        await eventually(lambda: _is(connection(sessions, device), "online"), timeout=10)
        await scan_once(js, sessions, partitions)  # the take-over read

        event.listen(engine, "before_cursor_execute", count)
        try:
            assert await scan_once(js, sessions, partitions) == 0
        finally:
            event.remove(engine, "before_cursor_execute", count)
        assert not [s for s in statements if "device_states" in s], statements

        # Its deadline passed: judged from memory, found, and applied by its partition.
        later = m.now() + timedelta(seconds=TIMEOUT_S + 1)
        assert await scan_once(js, sessions, partitions, now=later) == 1
        await eventually(lambda: _is(connection(sessions, device), "offline"), timeout=10)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await cache.close()


async def _is(value, expected) -> bool:  # type: ignore[no-untyped-def]
    return (await value) == expected
