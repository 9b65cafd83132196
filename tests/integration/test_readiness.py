"""A worker's readiness answers "can it make progress now?": the bus, the database and its
consumer bound, not the cache (the gateway's side: test_gateway_ops, test_bus_storage,
test_cache_faults). Defined once, in `libs.runtime.Process.ready`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from libs import bus, embedded_nats, runtime, subjects
from libs.cache import MemoryCache
from libs.consumer import Consumer
from libs.db.engine import make_engine, make_sessionmaker
from libs.db.migrate import upgrade
from libs.settings import Settings, async_database_url
from tests.helpers import eventually, unique_id
from tests.integration.test_actors_resilience import quiet_env
from tests.outage import PrivateNats, PrivatePostgres, postgres_bin
from tests.processes import Service


async def readiness(service: Service) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.get(f"http://127.0.0.1:{service.health_port}/health/ready")


@pytest.mark.skipif(postgres_bin() is None, reason="needs PostgreSQL server binaries to stop one")
@pytest.mark.parametrize("module", ["services.actors", "services.recorder"])
async def test_a_worker_is_ready_while_bus_and_database_answer_without_the_cache(
    tmp_path: Path, service_env, js, module: str
) -> None:  # type: ignore[no-untyped-def]
    """(`js`: the session's bus is provisioned.)"""
    pg = PrivatePostgres()
    try:
        pg.start()
        await asyncio.to_thread(upgrade, async_database_url(pg.url))
        nobody = f"redis://127.0.0.1:{embedded_nats.free_port()}/0"  # the cache is down
        env = {**quiet_env(service_env), "DATABASE_URL": pg.url, "REDIS_URL": nobody}
        worker = Service(module, env, tmp_path).start()  # ready, or this fails
        try:
            pg.stop()

            async def unready() -> httpx.Response | None:
                response = await readiness(worker)
                return response if response.status_code == 503 else None

            down = await eventually(unready, timeout=15)
            pg.start()
            await eventually(lambda: _ok(worker), timeout=30)
        finally:
            code = worker.stop()
    finally:
        pg.remove()
    assert code == 0, worker.tail()
    assert down.json()["status"] == "not ready"
    assert down.json()["reason"].startswith("the database is unreachable")


async def _ok(worker: Service) -> bool:
    return (await readiness(worker)).status_code == 200


@contextlib.asynccontextmanager
async def process(nc, database_url: str) -> AsyncIterator[runtime.Process]:  # type: ignore[no-untyped-def]
    engine = make_engine(database_url)
    stop = asyncio.Event()
    try:
        yield runtime.Process(
            "tests",
            Settings(),
            stop,
            nc,
            nc.jetstream(),
            engine,
            make_sessionmaker(engine),
            MemoryCache(),
        )
    finally:
        stop.set()
        await engine.dispose()


async def test_a_worker_is_not_ready_until_its_consumer_is_bound(nc, js, database_url) -> None:  # type: ignore[no-untyped-def]
    durable = unique_id("ready")
    config = ConsumerConfig(
        durable_name=durable, filter_subject=f"events.{durable}.>", ack_policy=AckPolicy.ALL
    )
    consumer: Consumer[bytes] = Consumer(
        nc, subjects.EVENTS_STREAM, config, lambda d: d.data, lambda _items: _none()
    )
    async with process(nc, database_url) as p:
        assert await p.ready() == "its work has not started"
        p.ready_when(consumer)
        running = asyncio.create_task(consumer.run(p.stop))
        try:
            assert await p.ready() == f"not bound yet: {durable}"  # not provisioned yet
            await js.add_consumer(subjects.EVENTS_STREAM, config)

            assert await eventually(lambda: _is_ready(p), timeout=10)
        finally:
            p.stop.set()
            await running
            await js.delete_consumer(subjects.EVENTS_STREAM, durable)
        assert await p.ready() == f"not bound yet: {durable}"  # stopped: unbound again


async def test_a_worker_is_not_ready_while_its_database_does_not_answer(nc) -> None:  # type: ignore[no-untyped-def]
    nowhere = f"postgresql+asyncpg://nobody@127.0.0.1:{embedded_nats.free_port()}/none"
    bound = asyncio.Event()
    bound.set()
    async with process(nc, nowhere) as p:
        p.ready_when(bound)

        reason = await p.ready()

    assert reason is not None and reason.startswith("the database is unreachable"), reason


async def test_a_worker_is_ready_once_what_it_reads_is_provisioned(
    tmp_path: Path, service_env
) -> None:  # type: ignore[no-untyped-def]
    nats_server = PrivateNats(tmp_path / "nats")
    nats_server.start()
    worker = Service("services.recorder", {**service_env, "NATS_URL": nats_server.url}, tmp_path)
    starting = asyncio.create_task(asyncio.to_thread(worker.start, 60))
    try:

        async def waiting() -> httpx.Response | None:
            with contextlib.suppress(httpx.HTTPError):
                response = await readiness(worker)
                return response if response.status_code == 503 else None
            return None

        down = await eventually(waiting, timeout=30)
        assert down.json()["reason"].startswith("waiting for the gateway to provision")
        nc = await bus.connect(nats_server.url, "provisioner")
        try:
            await bus.ensure_streams(nc.jetstream())
        finally:
            await nc.close()
        await starting  # ready, or this raises
    finally:
        code = worker.stop()
        if nats_server.proc:
            nats_server.proc.terminate()
            nats_server.proc.wait(10)
    assert code == 0, worker.tail()


async def _none() -> None:
    return None


async def _is_ready(p: runtime.Process) -> bool:
    return await p.ready() is None
