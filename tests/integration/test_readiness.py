"""A worker's readiness answers "can it make progress now?": the bus and the database, not
the cache (the gateway's side: test_gateway_ops, test_bus_storage, test_cache_faults)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from libs import embedded_nats
from libs.db.migrate import upgrade
from libs.settings import async_database_url
from tests.helpers import eventually
from tests.integration.test_actors_resilience import quiet_env
from tests.outage import PrivatePostgres, postgres_bin
from tests.processes import Service


async def readiness(service: Service) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.get(f"http://127.0.0.1:{service.health_port}/health/ready")


@pytest.mark.skipif(postgres_bin() is None, reason="needs PostgreSQL server binaries to stop one")
@pytest.mark.parametrize("module", ["services.actors", "services.recorder"])
async def test_a_worker_is_ready_while_bus_and_database_answer_without_the_cache(
    tmp_path: Path, service_env, module: str
) -> None:  # type: ignore[no-untyped-def]
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
