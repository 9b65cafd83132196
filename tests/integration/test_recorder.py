"""The recorder: trace retention by count and age, per rule; no message lost at a crash."""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import pytest
from nats.js.errors import NotFoundError
from sqlalchemy import func, select

from libs import bus, subjects
from libs import messages as m
from libs.db.models import AuditEntry, HistoryEntry, RuleRun
from services.recorder.retention import prune_traces
from tests.helpers import eventually, unique_id
from tests.processes import Service
from tests.proxy import Relay


async def add_runs(sessions, rule_id: str, n: int, age_days: float = 0) -> None:  # type: ignore[no-untyped-def]
    async with sessions.begin() as session:
        for i in range(n):
            session.add(
                RuleRun(
                    rule_id=rule_id,
                    episode_id=f"{rule_id}-{i}",
                    kind="fired",
                    time=m.now() - timedelta(days=age_days),
                    device_id="d",
                    reason="r",
                    values={},
                    outcomes=[],
                    correlation_id="c",
                    source_seq=hash((rule_id, i, age_days)) % 10**12,
                )
            )


async def count(sessions, rule_id: str) -> int:  # type: ignore[no-untyped-def]
    async with sessions() as session:
        return await session.scalar(select(func.count()).where(RuleRun.rule_id == rule_id))


async def test_each_rule_keeps_its_newest_runs_and_none_too_old(sessions) -> None:  # type: ignore[no-untyped-def]
    busy, quiet, stale = unique_id("busy"), unique_id("quiet"), unique_id("stale")
    await add_runs(sessions, busy, 12)
    await add_runs(sessions, quiet, 3)
    await add_runs(sessions, stale, 2, age_days=40)
    await prune_traces(sessions, keep=10, days=30)
    assert (
        await count(sessions, busy),
        await count(sessions, quiet),
        await count(sessions, stale),
    ) == (10, 3, 0)
    async with sessions() as session:
        kept = (
            await session.scalars(select(RuleRun.episode_id).where(RuleRun.rule_id == busy))
        ).all()
    assert f"{busy}-0" not in kept and f"{busy}-11" in kept  # the oldest went first


async def history_of(sessions, device_id: str) -> list[dict]:  # type: ignore[no-untyped-def]
    async with sessions() as session:
        rows = await session.scalars(
            select(HistoryEntry).where(HistoryEntry.device_id == device_id)
        )
        return [row.data for row in rows]


async def test_events_a_dead_recorder_fetched_and_did_not_ack_are_recorded(
    service_env, data_dir, js, sessions
) -> None:  # type: ignore[no-untyped-def]
    meter, other = unique_id("meter"), unique_id("meter")
    old = m.make_event(meter, "telemetry", {"power_w": 12.5})
    await bus.publish(js, old.nats_subject, old, msg_id=old.id)
    # A recorder fetches it and dies before its ack; what came before it was recorded.
    dead = await js.pull_subscribe_bind(
        bus.recorder_durable(subjects.EVENTS_STREAM), stream=subjects.EVENTS_STREAM
    )
    while True:
        msgs = await dead.fetch(bus.RECORDER_BATCH, timeout=5)
        if any(subjects.published(msg.subject) == old.nats_subject for msg in msgs):
            break
        await msgs[-1].ack()
    await dead.unsubscribe()
    newer = m.make_event(other, "telemetry", {"power_w": 3.0})
    await bus.publish(js, newer.nats_subject, newer, msg_id=newer.id)  # its ack would ack `old`
    recorder = Service("services.recorder", service_env, data_dir).start()
    try:
        await eventually(lambda: history_of(sessions, other), timeout=15)
        recorded = await history_of(sessions, meter)
    finally:
        recorder.stop()
    assert recorded == [{"power_w": 12.5}]


async def test_events_lost_with_a_connection_are_recorded_once(
    service_env, data_dir, nats_url, js, sessions
) -> None:  # type: ignore[no-untyped-def]
    """Events the bus handed out on a connection that died before they arrived: the ack of a
    newer batch on the next connection would ack them unseen (AckPolicy.ALL)."""
    meter = unique_id("meter")
    durable = bus.recorder_durable(subjects.EVENTS_STREAM)
    relay = Relay(int(nats_url.rsplit(":", 1)[1]))
    recorder = Service("services.recorder", {**service_env, "NATS_URL": relay.url}, data_dir)
    sent = 0

    async def publish(n: int) -> int:
        nonlocal sent
        for _ in range(n):
            sent += 1
            event = m.make_event(meter, "telemetry", {"energy_wh": sent})
            ack = await bus.publish(js, event.nats_subject, event, msg_id=event.id)
        return ack.seq

    try:
        recorder.start()
        await publish(5)
        await eventually(lambda: _n(history_of(sessions, meter), 5), timeout=15)
        relay.drop()
        last = await publish(5)
        await eventually(lambda: _delivered(js, durable, last), timeout=10)
        relay.cut()
        await publish(5)
        recorded = await eventually(lambda: _n(history_of(sessions, meter), 15), timeout=30)
    finally:
        recorder.stop()
        relay.close()
    assert sorted(row["energy_wh"] for row in recorded) == list(range(1, 16))
    assert "never received" in recorder.tail(20_000)


async def _n(found, n: int):  # type: ignore[no-untyped-def]
    items = await found
    assert len(items) >= n, f"{len(items)} of {n}: {items}"
    return items


async def _delivered(js, durable: str, last_seq: int) -> bool:  # type: ignore[no-untyped-def]
    info = await js.consumer_info(subjects.EVENTS_STREAM, durable)
    return info.delivered.stream_seq >= last_seq


@pytest.mark.skipif(
    not os.environ.get("DATABASE_URL", "").startswith("postgresql"),
    reason="SQLite stores what Postgres refuses (a NUL in a text column): needs Postgres",
)
async def test_a_message_the_database_refuses_is_dead_lettered_and_the_rest_recorded(
    service_env, data_dir, js, sessions
) -> None:  # type: ignore[no-untyped-def]
    meter = unique_id("meter")
    # Anyone on the bus can publish an alert; a NUL byte in its source (the audit's actor)
    # is a row Postgres refuses, whatever the number of retries.
    bad = m.make_event(meter, "alert", {"severity": "warning"}, source="rule/a\x00b")
    good = m.make_event(meter, "alert", {"severity": "info"}, source="rule/fine")
    for n, alert in enumerate((bad, good)):
        await bus.publish(js, subjects.alert(f"{meter}-{n}"), alert, msg_id=alert.id)
    recorder = Service("services.recorder", service_env, data_dir).start()
    dead_subject = subjects.deadletter(subjects.alert(f"{meter}-0"))
    try:
        audited = await eventually(lambda: _audit_of(sessions, meter), timeout=30)
        dead = await eventually(lambda: _last(js, dead_subject), timeout=15)
    finally:
        recorder.stop()
    assert [(a.actor, a.result) for a in audited] == [("rule:fine", "info")]
    assert "refused by the database" in dead.headers[bus.DL_REASON]
    assert dead.headers[bus.DL_CONSUMER] == bus.recorder_durable(subjects.SYSTEM_STREAM)
    assert m.cloud_event_decoder.decode(dead.data) == bad


async def _audit_of(sessions, device_id: str) -> list[AuditEntry]:  # type: ignore[no-untyped-def]
    async with sessions() as session:
        rows = await session.scalars(select(AuditEntry).where(AuditEntry.device_id == device_id))
        return list(rows)


async def _last(js, subject: str):  # type: ignore[no-untyped-def]
    with contextlib.suppress(NotFoundError):
        return await js.get_last_msg(subjects.DEADLETTER_STREAM, subject)
    return None
