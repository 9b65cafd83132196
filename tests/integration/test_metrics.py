"""Metrics that answer an operator's questions move with traffic, and every /metrics parses.

In-process: the database's statement timer, the state cache's hits and misses, a command's
`pending` and `expired`, and the gateway's own /metrics. As processes (their /metrics scraped
and parsed): the actors' applied events, apply time, command statuses and consumer gauges;
a rule's run and its failed action; a webhook's retried and delivered requests.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from litestar.testing import AsyncTestClient
from nats.js import JetStreamContext
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, text

from libs import bus, commands, subjects
from libs import messages as m
from libs.cache import make_cache
from libs.db.engine import operation
from libs.db.models import CommandRecord, Device
from services.actors.partitions import partition_of
from tests.helpers import eventually, unique_id
from tests.integration import webhooks_support
from tests.integration.test_rules import add_devices, add_rule, report
from tests.integration.webhooks_support import Receiver, Subscriptions, publish, webhooks_service
from tests.processes import Service

# The shared fixtures, under their names: pytest finds them in this module.
client = webhooks_support.client
subs = webhooks_support.subs

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metric(name: str, **labels: str) -> float:
    """A sample of this process's registry (0 before the first)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def parse(exposition: str) -> Samples:
    """Every sample of a /metrics answer; the parser raises on a malformed one."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(service: Service) -> Samples:
    async with httpx.AsyncClient(timeout=5) as http:
        response = await http.get(f"http://127.0.0.1:{service.health_port}/metrics")
    assert response.status_code == 200, response.text
    return parse(response.text)


async def caught_up(js: JetStreamContext, stream: str, prefix: str, some: bool = True) -> bool:
    """Every consumer of `stream` named `prefix...` (and `some` at least) has handled all it
    was given: what other tests left in the stream no longer moves the counters compared."""
    consumers = [c for c in await js.consumers_info(stream) if c.name.startswith(prefix)]
    done = all(not c.num_pending and not c.num_ack_pending for c in consumers)
    return done and (bool(consumers) or not some)


@pytest.fixture
def actors(service_env: dict[str, str], data_dir: Path) -> Iterator[Service]:
    service = Service("services.actors", service_env, data_dir).start()
    yield service
    assert service.stop() == 0, service.tail()


# --- in-process ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("statement", "verb"),
    [
        ("SELECT 1", "select"),
        ("  insert INTO t VALUES (1)", "insert"),
        ("UPDATE t SET a = 1", "update"),
        ("DELETE FROM t", "delete"),
        ("WITH x AS (SELECT 1) SELECT * FROM x", "other"),
        ("PRAGMA journal_mode=WAL", "other"),
    ],
)
def test_a_statement_is_labelled_by_its_verb(statement: str, verb: str) -> None:
    assert operation(statement) == verb


async def test_a_database_query_moves_db_seconds(sessions) -> None:  # type: ignore[no-untyped-def]
    selects = metric("smarthome_db_seconds_count", operation="select")
    inserts = metric("smarthome_db_seconds_count", operation="insert")
    device = unique_id()
    async with sessions.begin() as session:
        session.add(Device(id=device, name=device, kind="sensor"))
    async with sessions() as session:
        await session.execute(text("SELECT 1"))
        assert await session.scalar(select(Device.id).where(Device.id == device)) == device

    assert metric("smarthome_db_seconds_count", operation="select") >= selects + 2
    assert metric("smarthome_db_seconds_count", operation="insert") >= inserts + 1
    assert metric("smarthome_db_seconds_sum", operation="select") > 0


async def test_a_cache_read_counts_a_hit_or_a_miss(redis_url: str | None) -> None:
    cache = make_cache(redis_url)
    present, absent = unique_id(), unique_id()
    hits, misses = metric("smarthome_cache_hits_total"), metric("smarthome_cache_misses_total")
    try:
        assert await cache.get(present) is None
        assert (metric("smarthome_cache_hits_total"), metric("smarthome_cache_misses_total")) == (
            hits,
            misses + 1,
        )
        await cache.put_newer([m.DeviceSnapshot(device_id=present, version=1, last_seq=1)])
        assert await cache.get(present) is not None
        assert set(await cache.get_many([present, absent])) == {present}
        assert await cache.get_many([]) == {}
        assert metric("smarthome_cache_hits_total") == hits + 2
        assert metric("smarthome_cache_misses_total") == misses + 2
    finally:
        await cache.delete(present)
        await cache.close()


async def test_a_command_is_pending_once_and_swept_to_expired_once(sessions, js) -> None:  # type: ignore[no-untyped-def]
    device = unique_id()
    command = commands.new(
        device_id=device,
        action="turn_off",
        params={},
        expires_s=-1.0,  # expired at once: nobody will answer it
        issued_by="test",
        correlation_id=m.new_id(),
    )
    # A status that came before its (rule's) command: its stand-in row waits for the record.
    early = m.CommandStatusData(command_id=m.new_id(), status="delivered")
    async with sessions.begin() as session:
        await session.execute(
            CommandRecord.__table__.insert(), [commands.stand_in(unique_id(), early)]
        )
    pending, expired = (
        metric("smarthome_commands_total", status="pending"),
        metric("smarthome_commands_total", status="expired"),
    )

    await commands.send(sessions, js, command)
    await commands.publish(js, command)  # sent again (a retry): the stream drops the copy
    assert metric("smarthome_commands_total", status="pending") == pending + 1

    swept = await commands.expire_overdue(sessions)
    assert swept >= 1  # ours, and any other test's left unanswered
    assert metric("smarthome_commands_total", status="expired") == expired + swept
    assert await commands.expire_overdue(sessions) == 0  # each command expires once
    async with sessions() as session:
        ours = await session.get(CommandRecord, command.id)
        stand_in = await session.get(CommandRecord, early.command_id)
    assert ours is not None and (ours.status, commands.effective_status(ours)) == (
        "expired",
        "expired",
    )
    assert stand_in is not None and stand_in.status == "delivered"


async def test_the_gateways_metrics_parse_and_include_the_shared_ones(
    client: AsyncTestClient,
) -> None:
    await client.get("/api/v1/devices")  # a database query at least
    response = await client.get("/metrics")
    assert response.status_code == 200
    samples = parse(response.text)
    names = {name for name, _ in samples}
    assert {"smarthome_db_seconds_count", "smarthome_gateway_requests_total"} <= names


# --- processes -------------------------------------------------------------------------------


async def test_actors_count_applied_events_by_type_and_command_statuses(
    actors: Service, sessions, js: JetStreamContext
) -> None:  # type: ignore[no-untyped-def]
    device = unique_id()
    await add_devices(sessions, device)
    command = commands.new(
        device_id=device,
        action="turn_off",
        params={},
        expires_s=60,
        issued_by="test",
        correlation_id=m.new_id(),
    )
    await commands.record(sessions, command)
    await eventually(lambda: caught_up(js, subjects.EVENTS_STREAM, "actors-"), 30)
    before = await scrape(actors)

    events = [
        m.make_event(device, "telemetry", {"power_w": 60.0}),
        m.make_event(device, "telemetry", {"power_w": 0.0}),
        m.make_event(device, "button", {"press": "long"}),  # a device's own type
        m.make_event(device, "command_status", {"command_id": command.id, "status": "done"}),
    ]
    for event in events:
        await bus.publish(js, event.nats_subject, event, msg_id=event.id)

    async def moved() -> Samples | None:
        after = await scrape(actors)
        done = value(after, "smarthome_commands_total", status="done") - value(
            before, "smarthome_commands_total", status="done"
        )
        return after if done >= 1 else None

    after = await eventually(moved, timeout=15)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("smarthome_events_applied_total", type="telemetry") == 2
    assert grew("smarthome_events_applied_total", type="custom") == 1
    assert grew("smarthome_events_applied_total", type="command_status") == 1
    assert ("smarthome_events_applied_total", frozenset({("type", "button")})) not in after
    assert grew("smarthome_commands_total", status="done") == 1
    assert grew("smarthome_event_apply_seconds_count") >= 1
    assert grew("smarthome_db_seconds_count", operation="update") >= 1  # the command's status
    partition = partition_of(device, bus.DEFAULT_PARTITIONS)  # the session's stream's count
    consumer = {"stream": subjects.EVENTS_STREAM, "consumer": bus.actors_durable(partition)}
    await eventually(
        lambda: _has(actors, "smarthome_consumer_ack_pending_messages", **consumer), timeout=15
    )
    async with sessions() as session:
        row = await session.get(CommandRecord, command.id)
    assert row is not None and row.status == "done"


async def _has(service: Service, name: str, **labels: str) -> bool:
    return (name, frozenset(labels.items())) in await scrape(service)


async def test_a_rule_run_and_its_failed_action_are_counted(
    service_env: dict[str, str], data_dir: Path, nc, js, sessions
) -> None:  # type: ignore[no-untyped-def]
    meter, light = unique_id("meter"), unique_id("light")
    await add_devices(sessions, meter, light)
    spec = m.RuleSpec(
        name="light on: turn it off, and a device that is not there",
        trigger=m.ThresholdTrigger(device_id=meter, attribute="power_w", above=1.0),
        actions=[
            m.CommandAction(device_id=light, action="turn_off"),
            m.CommandAction(device_id=unique_id("ghost"), action="turn_off"),
        ],
    )
    await add_rule(sessions, nc, spec)
    rules = Service("services.rules", service_env, data_dir).start()
    try:
        await eventually(lambda: "acquired" in rules.log(), timeout=10)
        await eventually(lambda: caught_up(js, subjects.SYSTEM_STREAM, "rules-"), timeout=30)
        await eventually(
            lambda: caught_up(js, subjects.EVENTS_STREAM, "rules-events-", some=False), timeout=30
        )
        before = await scrape(rules)
        await report(js, meter, 60.0, 1)

        async def fired() -> Samples | None:
            after = await scrape(rules)
            name = "smarthome_rule_runs_total"
            ran = value(after, name, kind="fired") > value(before, name, kind="fired")
            return after if ran else None

        after = await eventually(fired, timeout=15)
    finally:
        assert rules.stop() == 0, rules.tail()

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("smarthome_rule_runs_total", kind="fired") == 1
    assert grew("smarthome_rule_errors_total") == 1  # the device that is not there
    assert grew("smarthome_commands_total", status="pending") == 1


async def test_a_webhook_delivery_counts_its_retries_and_its_success(
    subs: Subscriptions, js: JetStreamContext, service_env: dict[str, str], data_dir: Path
) -> None:
    device = unique_id()
    async with Receiver(fail_first=1) as receiver, webhooks_service(service_env, data_dir) as svc:
        before = await scrape(svc)
        await subs.create(receiver, device)
        await publish(js, device, power_w=60.0)
        await eventually(lambda: len(receiver.delivered) == 1, timeout=15)

        async def counted() -> Samples | None:
            after = await scrape(svc)
            name = "smarthome_webhook_deliveries_total"
            done = value(after, name, result="delivered") > value(before, name, result="delivered")
            return after if done else None

        after = await eventually(counted, timeout=10)

    def grew(result: str) -> float:
        name = "smarthome_webhook_deliveries_total"
        return value(after, name, result=result) - value(before, name, result=result)

    assert (grew("retried"), grew("delivered"), grew("failed")) == (1, 1, 0)
