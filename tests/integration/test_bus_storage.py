"""A full bus refuses cleanly and heals: past JetStream's storage limit a publish answers
507 at once with the reason, the gateway is unready, and once space is freed publishing
goes on with no restart; nothing acknowledged is lost. The platform's streams have byte
budgets (a full one drops its oldest: test_stream_budgets.py), so here the store is filled
by a stream outside them, as another tenant of the bus could."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from litestar.testing import AsyncTestClient
from nats.js.api import StorageType

from libs import bus
from libs import messages as m
from libs.errors import StorageFull
from libs.settings import Settings
from tests.api import api_client
from tests.helpers import eventually, unique_id
from tests.outage import PrivateNats

EVENTS = "/api/v1/events"
LIMIT = 4 * 1024 * 1024
FILLER = b"x" * 64 * 1024
# A stream with no budget, beside the platform's.
FILLER_STREAM = "FILLER"


@pytest.fixture
def small_bus(tmp_path: Path):  # type: ignore[no-untyped-def]
    with PrivateNats.running(tmp_path / "nats", LIMIT) as server:
        yield server


@pytest.fixture
async def client(
    settings: Settings, admin_token: str, small_bus: PrivateNats
) -> AsyncIterator[AsyncTestClient]:
    budgeted = dataclasses.replace(settings, nats_url=small_bus.url, nats_max_store=LIMIT)
    async with api_client(budgeted, admin_token) as c:
        yield c


async def fill(js, subject: str) -> int:  # type: ignore[no-untyped-def]
    """Publish until the bus refuses for want of storage; how many it took."""
    for stored in range(2 * LIMIT // len(FILLER)):
        try:
            await bus.publish(js, subject, FILLER)
        except StorageFull:
            return stored
    raise AssertionError(f"the bus stored {2 * LIMIT} bytes past its {LIMIT} bytes limit")


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} not in /metrics"
    return float(found[1])


async def test_a_full_bus_answers_507_at_once_and_publishing_resumes_after_space_is_freed(
    client: AsyncTestClient, small_bus: PrivateNats
) -> None:
    device = unique_id("full")
    nc = await bus.connect(small_bus.url, "storage-test")
    js = nc.jetstream()
    accepted: list[dict] = []
    try:
        for n in range(3):
            event = m.make_event(device, "telemetry", {"n": n})
            response = await client.post(EVENTS, json=msgspec.to_builtins(event))
            assert response.status_code == 202, response.text
            accepted.append(response.json())
        assert (await client.get("/health/ready")).status_code == 200

        budget = (await js.stream_info("EVENTS")).config.max_bytes
        await js.add_stream(name=FILLER_STREAM, subjects=["filler.>"], storage=StorageType.FILE)
        assert await fill(js, "filler.x") > 0
        event = m.make_event(device, "telemetry", {"n": 3})
        started = time.monotonic()
        refused = await client.post(EVENTS, json=msgspec.to_builtins(event))
        took = time.monotonic() - started
        batch = [m.make_event(device, "telemetry", {"n": n}) for n in (4, 5)]
        refused_batch = await client.post(EVENTS, json=msgspec.to_builtins(batch))
        unready = await client.get("/health/ready")
        metrics = (await client.get("/metrics")).text

        await js.purge_stream(FILLER_STREAM)

        async def ready_again() -> bool:
            return (await client.get("/health/ready")).status_code == 200

        await eventually(ready_again)
        again = await client.post(EVENTS, json=msgspec.to_builtins(event))
        assert again.status_code == 202, again.text
        accepted.append(again.json())
        healed = (await client.get("/metrics")).text
        stored = [
            m.cloud_event_decoder.decode((await js.get_msg("EVENTS", a["seq"])).data or b"")
            for a in accepted
        ]
    finally:
        await nc.close()

    for response in (refused, refused_batch):
        assert response.status_code == 507, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert "storage is full" in response.json()["detail"]
        assert response.headers["Retry-After"]
    assert budget == bus.stream_budgets(LIMIT)["EVENTS"]  # refused all the same
    assert took < 1.0  # refused at once, not after a publish timeout
    assert unready.status_code == 503
    assert "full" in unready.json()["detail"]
    assert metric(metrics, "smarthome_gateway_bus_storage_refusals_total") >= 2
    assert metric(metrics, "smarthome_gateway_bus_storage_full") == 1
    assert metric(healed, "smarthome_gateway_bus_storage_full") == 0
    # Nothing acknowledged is lost: each accepted event is stored where its answer said.
    assert [e.id for e in stored] == [a["id"] for a in accepted]
