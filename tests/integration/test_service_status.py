"""Each process reports itself on the bus; `GET /api/v1/system/services` (administrators)
lists them: ready with where its metrics are, `gone` once its process died, absent once
it stopped cleanly."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from prometheus_client.parser import text_string_to_metric_families

from libs import bus, service_status
from libs.principals import Role
from libs.settings import Settings
from tests.api import api_client, bearer
from tests.helpers import eventually
from tests.processes import Service

SERVICES = "/api/v1/system/services"
# The recorders here write their status twice a second (5 s by default), so that a killed
# one is seen gone after its three missed writes: 1.5 s, not 15.
STATUS_INTERVAL_S = 0.5
FORGED_WAIT_S = 1.0


@pytest.fixture(scope="module")
async def client(settings: Settings, admin_token: str) -> AsyncIterator[AsyncTestClient]:
    async with api_client(settings, admin_token) as client:
        yield client


async def entries(client: AsyncTestClient, name: str, pid: int | None = None) -> list[Any]:
    response = await client.get(SERVICES)
    assert response.status_code == 200, response.text
    return [
        item
        for item in response.json()["items"]
        if item["name"] == name and (pid is None or item["instance"].endswith(f"-{pid}"))
    ]


async def test_the_gateway_lists_itself_ready(client: AsyncTestClient) -> None:
    async def ready() -> list[Any]:
        return [e for e in await entries(client, "gateway") if e["ready"]]

    (gateway, *_) = await eventually(ready, timeout=15)

    assert gateway["state"] == "ready" and gateway["why_not_ready"] is None
    assert gateway["metrics_url"].endswith("/metrics")
    assert gateway["restarts"] == 0 and gateway["uptime_s"] >= 0
    assert gateway["version"]


@pytest.mark.parametrize("role", [Role.RESIDENT, Role.INSTALLER])
async def test_only_an_administrator_sees_the_services(
    client: AsyncTestClient, make_token: Any, role: Role
) -> None:
    token = await make_token(role, ["home-a"])

    response = await client.get(SERVICES, headers=bearer(token))

    assert response.status_code == 403, response.text


async def test_a_killed_worker_turns_gone_and_a_stopped_one_disappears(
    client: AsyncTestClient, service_env: dict[str, str], data_dir: Any
) -> None:
    env = {**service_env, "SMARTHOME_STATUS_INTERVAL_S": str(STATUS_INTERVAL_S)}
    killed = Service("services.recorder", env, data_dir)
    stopped = Service("services.recorder", env, data_dir)
    try:
        # Both at once: starting a process is most of this test's time.
        await asyncio.gather(asyncio.to_thread(killed.start), asyncio.to_thread(stopped.start))
        assert killed.proc is not None and stopped.proc is not None
        pid = killed.proc.pid

        async def listed_ready() -> list[Any]:
            return [e for e in await entries(client, "recorder", pid) if e["ready"]]

        (entry,) = await eventually(listed_ready, timeout=20)
        assert entry["metrics_url"] == f"http://127.0.0.1:{killed.health_port}/metrics"
        page = httpx.get(entry["metrics_url"], timeout=5).text
        names = {f.name for f in text_string_to_metric_families(page)}
        assert "smarthome_consumer_delivered" in names, sorted(names)

        killed.kill9()

        async def gone() -> list[Any]:
            return [e for e in await entries(client, "recorder", pid) if e["state"] == "gone"]

        # Seen gone well before the default interval's three writes (15 s) would allow.
        (dead,) = await eventually(gone, timeout=service_status.GONE_AFTER * STATUS_INTERVAL_S + 10)
        assert (dead["ready"], dead["uptime_s"]) == (False, None)
        assert dead["why_not_ready"].startswith("no word from it for")

        pid = stopped.proc.pid
        await eventually(lambda: entries(client, "recorder", pid), timeout=20)
        assert stopped.stop() == 0, stopped.tail()
        assert await entries(client, "recorder", pid) == []
    finally:
        killed.stop()
        stopped.stop()


async def test_a_service_writes_only_its_own_status(
    nats_url: str, bus_passwords: dict[str, Any], js: JetStreamContext
) -> None:
    recorder = await bus.connect(
        nats_url, "tests-recorder", "recorder", bus_passwords["recorder"].password
    )
    try:
        kv = await recorder.jetstream().key_value(service_status.BUCKET)
        await kv.put("recorder.tests", b"{}")
        # Refused by the bus, which answers nothing: waited on for a second, not nats-py's 5.
        with pytest.raises((NatsError, TimeoutError)):
            await asyncio.wait_for(kv.put("gateway.forged", b"{}"), FORGED_WAIT_S)
        await kv.delete("recorder.tests")
    finally:
        await recorder.close()
    # ... and not stored late: the operator (who reads everything) finds no such entry.
    with pytest.raises(KeyNotFoundError):
        await (await js.key_value(service_status.BUCKET)).get("gateway.forged")
