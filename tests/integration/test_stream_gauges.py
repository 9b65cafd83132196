"""What SmarthomeConsumerBacklogAtRisk reads, from a real nats-server: the gateway reports
each stream's messages, bytes, newest sequence and byte budget on /metrics (0 when it has
none), and a consumer reports its ack floor, which stays where its backlog begins while it
falls behind."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from libs import bus, subjects
from libs import messages as m
from libs.consumer import Consumer, Item, Retry
from libs.settings import Settings
from tests.api import api_client
from tests.consumers import decode, running, scratch_stream
from tests.helpers import eventually, unique_id
from tests.outage import PrivateNats

STORE = 8 * 1024 * 1024
PUBLISHED = 25
GAUGES = ("messages", "bytes", "last_seq", "max_bytes")


@pytest.fixture
def small_bus(tmp_path: Path) -> Iterator[PrivateNats]:
    with PrivateNats.running(tmp_path / "nats", STORE) as server:
        yield server


@pytest.fixture
async def budgeted(
    settings: Settings, admin_token: str, small_bus: PrivateNats
) -> AsyncIterator[AsyncTestClient]:
    """A gateway on a bus of its own whose streams have budgets; it measures them often."""
    own = dataclasses.replace(
        settings, nats_url=small_bus.url, nats_max_store=STORE, status_interval_s=0.2
    )
    async with api_client(own, admin_token) as c:
        yield c


def gauge(name: str, stream: str) -> float | None:
    """A stream gauge as this process's registry holds it (the gateway runs in-process)."""
    return REGISTRY.get_sample_value(f"smarthome_stream_{name}", {"stream": stream})


async def stream_gauges(client: AsyncTestClient) -> dict[str, dict[str, float]]:
    """`{stream: {"messages": …, "bytes": …, …}}` as the gateway's /metrics shows them."""
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    found: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(response.text):
        kind = family.name.removeprefix("smarthome_stream_")
        if kind in GAUGES:
            for sample in family.samples:
                found.setdefault(sample.labels["stream"], {})[kind] = sample.value
    return found


async def test_the_gateway_reports_what_each_stream_holds_against_its_budget(
    budgeted: AsyncTestClient, small_bus: PrivateNats
) -> None:
    device = unique_id("gauges")
    nc = await bus.connect(small_bus.url, "gauges-test")
    js = nc.jetstream()
    try:
        for n in range(PUBLISHED):
            event = m.make_event(device, "telemetry", {"n": n})
            await bus.publish(js, subjects.device_events(device, "telemetry"), event)
        state = (await js.stream_info(subjects.EVENTS_STREAM)).state

        await eventually(lambda: gauge("messages", subjects.EVENTS_STREAM) == PUBLISHED)
        gauges = await stream_gauges(budgeted)
        budgets = {name: (await js.stream_info(name)).config.max_bytes for name in gauges}
    finally:
        await nc.close()

    assert state.messages == PUBLISHED
    assert gauges[subjects.EVENTS_STREAM] == {
        "messages": PUBLISHED,
        "bytes": state.bytes,
        "last_seq": state.last_seq,
        "max_bytes": bus.stream_budgets(STORE)[subjects.EVENTS_STREAM],
    }
    # Every platform stream, each with the budget ensure_streams gave it.
    assert budgets == {name: gauges[name]["max_bytes"] for name in bus.STREAM_STORE_SHARES}
    assert budgets == bus.stream_budgets(STORE)


async def test_a_stream_with_no_budget_reports_a_budget_of_0(
    settings: Settings, admin_token: str
) -> None:
    """The session's bus, its store size not given to the gateway: no budgets."""
    often = dataclasses.replace(settings, status_interval_s=0.2)
    async with api_client(often, admin_token) as client:
        await eventually(
            lambda: all(gauge("max_bytes", name) == 0 for name in bus.STREAM_STORE_SHARES)
        )
        gauges = await stream_gauges(client)

    for name in bus.STREAM_STORE_SHARES:
        assert set(gauges[name]) == set(GAUGES), name
        assert gauges[name]["max_bytes"] == 0, name


@dataclass
class Stalling:
    """A worker that handles what it gets until told the database is down."""

    handled: list[int] = field(default_factory=list)
    down: bool = False

    async def handle(self, items: list[Item[dict[str, Any]]]) -> None:
        if self.down:
            raise Retry("the database is down")
        self.handled += [item.delivery.seq for item in items]


def sample(name: str, labels: dict[str, str]) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


async def test_a_stalled_consumers_ack_floor_stays_where_its_backlog_begins(
    nc: Any, js: Any
) -> None:
    async with scratch_stream(js, "GAUGES") as (name, prefix):
        config = ConsumerConfig(
            durable_name="g",
            filter_subject=f"{prefix}.>",
            ack_policy=AckPolicy.ALL,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=30.0,
            max_ack_pending=100,
        )
        worker = Stalling()
        consumer = Consumer(nc, name, config, decode, worker.handle, create=True, pending_every=0.1)
        labels = {"stream": name, "consumer": "g"}
        async with running(consumer):
            for n in range(3):
                await js.publish(f"{prefix}.a", b'{"n": %d}' % n)
            await eventually(lambda: sample("smarthome_consumer_ack_floor_stream_seq", labels) == 3)
            kept_up = sample("smarthome_consumer_pending_messages", labels)

            worker.down = True
            for n in range(4):
                last = (await js.publish(f"{prefix}.a", b'{"n": %d}' % n)).seq

            def backlog() -> float:
                pending = sample("smarthome_consumer_pending_messages", labels) or 0.0
                return pending + (sample("smarthome_consumer_ack_pending_messages", labels) or 0.0)

            await eventually(lambda: backlog() == 4)
            stalled_floor = sample("smarthome_consumer_ack_floor_stream_seq", labels)
        # Stopped (its partition another's, say): it reports nothing, not its last values.
        after_stop = [
            sample(f"smarthome_consumer_{gauge}", labels)
            for gauge in ("pending_messages", "ack_pending_messages", "ack_floor_stream_seq")
        ]

    assert worker.handled == [1, 2, 3]
    assert kept_up == 0
    # The stream's newest less the ack floor: the 4 messages of its backlog, none acked.
    assert last - (stalled_floor or 0) == 4
    assert after_stop == [None, None, None]
