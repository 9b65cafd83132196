"""Each stream has a byte budget, a share of the bus's store: a busy stream drops its oldest
messages and ingestion goes on, instead of the full store refusing everything (507) until
the age limits free space. Checked against a real nats-server with a small store."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest
from litestar.testing import AsyncTestClient
from nats.js.api import DiscardPolicy

from libs import bus, subjects
from libs import messages as m
from libs.settings import Settings, SettingsError
from services.launcher import cli
from tests.api import api_client
from tests.helpers import unique_id
from tests.outage import PrivateNats

EVENTS = "/api/v1/events"
STORE = 8 * 1024 * 1024
BLOB = "x" * 16 * 1024
BATCH = 50  # about 800 kB a request, under the gateway's 1 MB body limit


@pytest.fixture
def small_bus(tmp_path: Path) -> Iterator[PrivateNats]:
    with PrivateNats.running(tmp_path / "nats", STORE) as server:
        yield server


@pytest.fixture
async def client(
    settings: Settings, admin_token: str, small_bus: PrivateNats
) -> AsyncIterator[AsyncTestClient]:
    budgeted = dataclasses.replace(settings, nats_url=small_bus.url, nats_max_store=STORE)
    async with api_client(budgeted, admin_token) as c:
        yield c


async def _fill_events(js, device: str, size: int) -> None:  # type: ignore[no-untyped-def]
    for n in range(size // len(BLOB) + 1):
        event = m.make_event(device, "telemetry", {"n": n, "blob": BLOB})
        await bus.publish(js, subjects.device_events(device, "telemetry"), event)


async def test_a_busy_stream_drops_its_oldest_and_ingestion_goes_on(
    client: AsyncTestClient, small_bus: PrivateNats
) -> None:
    device = unique_id("busy")
    budgets = bus.stream_budgets(STORE)
    nc = await bus.connect(small_bus.url, "budget-test")
    js = nc.jetstream()
    try:
        for name, budget in budgets.items():  # as the gateway provisioned them
            config = (await js.stream_info(name)).config
            assert (config.max_bytes, config.discard) == (budget, DiscardPolicy.OLD), name
        statuses = []
        published = 0
        while published < 3 * budgets[subjects.EVENTS_STREAM]:
            batch = [m.make_event(device, "telemetry", {"blob": BLOB}) for _ in range(BATCH)]
            response = await client.post(EVENTS, json=msgspec.to_builtins(batch))
            statuses.append(response.status_code)
            published += BATCH * len(BLOB)
        last = m.make_event(device, "telemetry", {"n": "last"})
        answer = await client.post(EVENTS, json=msgspec.to_builtins(last))
        ready = await client.get("/health/ready")
        state = (await js.stream_info(subjects.EVENTS_STREAM)).state
        stored = await js.get_msg(subjects.EVENTS_STREAM, answer.json()["seq"])
    finally:
        await nc.close()

    assert set(statuses) == {202}, statuses  # never 507
    assert answer.status_code == 202, answer.text
    assert ready.status_code == 200, ready.text
    assert state.bytes <= budgets[subjects.EVENTS_STREAM]
    assert state.first_seq > 1  # the oldest were dropped
    assert m.cloud_event_decoder.decode(stored.data or b"").id == last.id


async def test_a_lowered_budget_trims_a_stream_already_larger(small_bus: PrivateNats) -> None:
    nc = await bus.connect(small_bus.url, "budget-test")
    js = nc.jetstream()
    try:
        await bus.ensure_streams(js, max_store=STORE)
        await _fill_events(js, unique_id("trim"), bus.stream_budgets(STORE)["EVENTS"])
        before = (await js.stream_info(subjects.EVENTS_STREAM)).state
        smaller = bus.stream_budgets(STORE // 2)["EVENTS"]
        assert before.bytes > smaller

        await bus.ensure_streams(js, max_store=STORE // 2)
        info = await js.stream_info(subjects.EVENTS_STREAM)
    finally:
        await nc.close()

    assert info.config.max_bytes == smaller
    assert info.state.bytes <= smaller
    assert info.state.first_seq > before.first_seq
    assert info.state.last_seq == before.last_seq  # the newest are kept


async def test_with_no_known_store_the_streams_have_no_budget(
    small_bus: PrivateNats, caplog: pytest.LogCaptureFixture
) -> None:
    nc = await bus.connect(small_bus.url, "budget-test")
    js = nc.jetstream()
    try:
        await bus.ensure_streams(js, max_store=STORE)
        with caplog.at_level(logging.INFO, logger="libs.bus"):
            await bus.ensure_streams(js)  # a budget given before is taken off
        budgets = [(await js.stream_info(s)).config.max_bytes for s in bus.STREAM_STORE_SHARES]
    finally:
        await nc.close()

    assert budgets == [-1] * len(bus.STREAMS)
    assert "no byte budgets" in caplog.text


async def _restart_and_provision(server: PrivateNats, limit: int, max_store: int) -> None:
    """The bus started again with `limit`, then the gateway's provisioning for `max_store`."""
    server.stop()
    server.max_file_store = limit
    server.start()
    nc = await bus.connect(server.url, "budget-test")
    try:
        await bus.ensure_streams(nc.jetstream(), max_store=max_store)
    finally:
        await nc.close()


async def test_a_much_smaller_store_applies_once_the_budgets_are_lowered(
    small_bus: PrivateNats,
) -> None:
    """nats-server reserves the budgets out of its limit and changes no stream while they
    exceed it: given half its store at once, the gateway could not start; the launcher
    keeps the old size for one start, in which the gateway lowers the budgets. A store
    lowered within the budgets' headroom applies at once."""
    nc = await bus.connect(small_bus.url, "budget-test")
    try:
        await bus.ensure_streams(nc.jetstream(), max_store=STORE)
    finally:
        await nc.close()
    slightly, half = STORE * 19 // 20, STORE // 2

    assert cli.server_store(small_bus.root, slightly) == slightly
    await _restart_and_provision(small_bus, slightly, slightly)
    with pytest.raises(SettingsError, match="SMARTHOME_NATS_MAX_STORE"):
        await _restart_and_provision(small_bus, half, half)  # as the chart would: refused
    await _restart_and_provision(small_bus, cli.server_store(small_bus.root, half), half)
    assert cli.server_store(small_bus.root, half) == half  # the next start gets it
    await _restart_and_provision(small_bus, half, half)
