"""Redis is only a cache: a Redis restarted from an old snapshot, flushed, or written by
another process moves no device's state backwards, in the API or the database; with Redis
down, state keeps moving and the cache is filled again once it is back."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as redis
from litestar.testing import AsyncTestClient

from libs import messages as m
from libs.cache import KEY_PREFIX
from libs.settings import Settings
from tests.api import api_client
from tests.factories import add_devices
from tests.helpers import eventually, unique_id
from tests.integration.test_actors import states
from tests.integration.test_actors_resilience import quiet_env
from tests.integration.test_outages import all_at, publish
from tests.outage import PrivateRedis
from tests.processes import Service

ROUND = 20  # events per device and round
DEVICES = "/api/v1/devices"


@pytest.fixture
def private_redis(tmp_path: Path):  # type: ignore[no-untyped-def]
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


async def cached(url: str, devices: list[str]) -> dict[str, m.DeviceSnapshot]:
    async with redis.from_url(url) as client:
        values = await client.mget([KEY_PREFIX + d for d in devices])
    return {d: m.snapshot_decoder.decode(v) for d, v in zip(devices, values, strict=True) if v}


async def cached_at(url: str, devices: list[str], version: int) -> bool:
    found = {d: s.version for d, s in (await cached(url, devices)).items()}
    assert found == dict.fromkeys(devices, version), found
    return True


async def api_states(client: AsyncTestClient, kind: str) -> dict[str, tuple[int, int]]:
    """(version, last n) of each device of `kind`, as the API answers."""
    response = await client.get(DEVICES, params={"kind": kind, "limit": "100"})
    assert response.status_code == 200, response.text
    return {d["id"]: (d["version"], d["attributes"].get("n", -1)) for d in response.json()["items"]}


class Watch:
    """Reads the devices' state from the API and the database over and over while the test
    runs, and notes every step back of a version or of the attributes (`n`)."""

    def __init__(self, client: AsyncTestClient, sessions) -> None:  # type: ignore[no-untyped-def]
        self.client = client
        self._sessions = sessions
        self.backwards: list[str] = []
        self.reads = 0
        self._task: asyncio.Task[None] | None = None

    def start(self, kind: str, devices: list[str]) -> None:
        self._task = asyncio.create_task(self._follow(kind, devices))

    async def _follow(self, kind: str, devices: list[str]) -> None:
        last: dict[tuple[str, str], tuple[int, int]] = {}
        while True:
            rows = await states(self._sessions, devices)
            now = {("database", d): (s.version, s.attributes.get("n", -1)) for d, s in rows.items()}
            now |= {("API", d): seen for d, seen in (await api_states(self.client, kind)).items()}
            for where, seen in now.items():
                before = last.get(where, (0, -1))
                if seen[0] < before[0] or seen[1] < before[1]:
                    self.backwards.append(f"{where}: {before} -> {seen}")
                last[where] = max(before, seen)
            self.reads += 1
            await asyncio.sleep(0.02)  # a sampling period, not a wait for a condition

    async def stop(self) -> None:
        """Stop reading; raise what made the reading fail, if anything did."""
        assert self._task is not None
        if not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        else:
            self._task.result()


@pytest.fixture
async def watch(  # type: ignore[no-untyped-def]
    settings: Settings, admin_token: str, private_redis: PrivateRedis, sessions
) -> AsyncIterator[Watch]:
    """The gateway on the private Redis, and a watch on what it and the database answer."""
    config = dataclasses.replace(settings, redis_url=private_redis.url)
    async with api_client(config, admin_token) as client:
        yield Watch(client, sessions)


async def test_a_restored_flushed_or_overwritten_cache_moves_no_state_backwards(
    tmp_path: Path, service_env, js, sessions, private_redis: PrivateRedis, watch: Watch
) -> None:  # type: ignore[no-untyped-def]
    client = watch.client
    kind = unique_id("cachefault")
    devices = await add_devices(sessions, kind=kind, count=5)
    env = {**quiet_env(service_env), "REDIS_URL": private_redis.url}
    actors = Service("services.actors", env, tmp_path).start()
    watch.start(kind, devices)
    try:
        await publish(js, devices, 0, ROUND)
        await eventually(lambda: all_at(sessions, devices, ROUND), timeout=30)
        await eventually(lambda: cached_at(private_redis.url, devices, ROUND))
        old = private_redis.snapshot("old.rdb")
        old_values = await cached(private_redis.url, devices)
        await publish(js, devices, ROUND, ROUND)
        await eventually(lambda: all_at(sessions, devices, 2 * ROUND), timeout=30)
        await eventually(lambda: cached_at(private_redis.url, devices, 2 * ROUND))

        # 1. A crash, and Redis back from its older snapshot: the cache says v20, not v40.
        private_redis.kill9()
        private_redis.restart_from(old)
        assert await cached_at(private_redis.url, devices, ROUND)
        assert {v for v, _ in (await api_states(client, kind)).values()} == {2 * ROUND}
        await publish(js, devices, 2 * ROUND, ROUND)
        await eventually(lambda: all_at(sessions, devices, 3 * ROUND), timeout=30)
        await eventually(lambda: cached_at(private_redis.url, devices, 3 * ROUND))

        # 2. FLUSHALL.
        async with redis.from_url(private_redis.url) as r:
            await r.flushall()
        assert {v for v, _ in (await api_states(client, kind)).values()} == {3 * ROUND}
        await publish(js, devices, 3 * ROUND, ROUND)
        await eventually(lambda: all_at(sessions, devices, 4 * ROUND), timeout=30)
        await eventually(lambda: cached_at(private_redis.url, devices, 4 * ROUND))

        # 3. Another process writes the old states back.
        async with redis.from_url(private_redis.url) as r:
            await r.mset({KEY_PREFIX + d: m.encode(s) for d, s in old_values.items()})
        assert {v for v, _ in (await api_states(client, kind)).values()} == {4 * ROUND}
        await publish(js, devices, 4 * ROUND, ROUND)
        await eventually(lambda: all_at(sessions, devices, 5 * ROUND), timeout=30)
        await eventually(lambda: cached_at(private_redis.url, devices, 5 * ROUND))
        await eventually(lambda: watch.reads > 3)
        final = await states(sessions, devices)
        api_final = await api_states(client, kind)
    finally:
        code = actors.stop()
        await watch.stop()
    assert code == 0, actors.tail()
    assert watch.backwards == []
    # Every accepted event applied once: one version per event, the last one's attributes.
    assert {d: (s.version, s.attributes) for d, s in final.items()} == dict.fromkeys(
        devices, (5 * ROUND, {"n": 5 * ROUND - 1})
    )
    assert api_final == dict.fromkeys(devices, (5 * ROUND, 5 * ROUND - 1))


async def test_state_keeps_moving_while_the_cache_is_down(
    tmp_path: Path, service_env, js, sessions, private_redis: PrivateRedis, watch: Watch
) -> None:  # type: ignore[no-untyped-def]
    kind = unique_id("cachedown")
    devices = await add_devices(sessions, kind=kind, count=10)
    env = {**quiet_env(service_env), "REDIS_URL": private_redis.url}
    actors = Service("services.actors", env, tmp_path).start()
    ready = f"http://127.0.0.1:{actors.health_port}/health/ready"
    watch.start(kind, devices)
    try:
        await publish(js, devices, 0, 5)
        await eventually(lambda: all_at(sessions, devices, 5), timeout=30)
        await eventually(lambda: cached_at(private_redis.url, devices, 5))

        private_redis.kill9()
        sent, rounds, outage_ends = 5, 0, time.monotonic() + 10
        while time.monotonic() < outage_ends:  # under load: a round of events at a time
            await publish(js, devices, sent, 5)
            sent += 5
            await eventually(lambda n=sent: all_at(sessions, devices, n), timeout=5)
            async with httpx.AsyncClient() as http:
                answer = await http.get(ready)  # the cache is not required
                assert answer.status_code == 200, (answer.text, actors.tail())
            gateway = await watch.client.get("/health/ready")
            assert (gateway.status_code, gateway.json()["status"]) == (200, "degraded")
            rounds += 1

        private_redis.start()  # empty: it was killed before it saved a snapshot

        async def refilled() -> bool:
            """The cache is written again by the writes after the outage."""
            nonlocal sent
            await publish(js, devices, sent, 1)
            sent += 1
            await eventually(lambda: all_at(sessions, devices, sent), timeout=10)
            return await cached_at(private_redis.url, devices, sent)

        await eventually(refilled, timeout=30, interval=0.5)
        final = await states(sessions, devices)
    finally:
        code = actors.stop()
        await watch.stop()
    assert code == 0, actors.tail()
    assert rounds >= 3
    assert "state cache unavailable, going on without it" in actors.tail(20000)
    assert watch.backwards == []
    assert {d: (s.version, s.attributes) for d, s in final.items()} == dict.fromkeys(
        devices, (sent, {"n": sent - 1})
    )
