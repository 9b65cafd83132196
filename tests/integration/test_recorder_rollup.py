"""Hourly statistics and retention: what the recorder keeps of a device's history, and for
how long. One round of the job is run directly, against the session's database."""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import msgspec
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import func, insert, select

from libs import audit_chain, bus
from libs import messages as m
from libs.db import audit
from libs.db.engine import make_engine, make_sessionmaker
from libs.db.models import HistoryEntry, HourlyStatistic, RollupPending
from libs.settings import Settings
from services.recorder import rollup
from services.recorder.hourly import hour_of
from tests.api import api_client
from tests.helpers import eventually, unique_id
from tests.processes import Service

KEEP = rollup.Keep(history_days=10, statistics_days=730, audit_days=365)
AUDIT_KEY = audit_chain.checkpoint_key("k" * 40)
# Unique per (stream, seq), as the recorder's are.
SEQ = itertools.count(uuid.uuid4().int % 10**15)


@pytest.fixture(scope="module")
async def client(settings: Settings, admin_token: str) -> AsyncIterator[AsyncTestClient]:
    async with api_client(settings, admin_token) as client:
        yield client


def three_days_ago() -> datetime:
    return hour_of(m.now()) - timedelta(days=3)


async def write_history(sessions, device_id: str, rows: list[tuple[datetime, str, dict]]) -> None:  # type: ignore[no-untyped-def]
    """What the recorder writes: the rows, and their hours marked pending."""
    values = [
        {
            "device_id": device_id,
            "time": time,
            "type": type_,
            "data": data,
            "stream": "TEST",
            "source_seq": next(SEQ),
        }
        for time, type_, data in rows
    ]
    async with sessions.begin() as session:
        await session.execute(insert(HistoryEntry), values)
        await session.execute(rollup.mark_pending(session.bind), rollup.pending_hours(values))


async def statistics_of(sessions, device_id: str) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    async with sessions() as session:
        rows = await session.scalars(
            select(HourlyStatistic)
            .where(HourlyStatistic.device_id == device_id)
            .order_by(HourlyStatistic.hour, HourlyStatistic.attribute)
        )
        return [
            {c.name: getattr(row, c.name) for c in HourlyStatistic.__table__.columns}
            for row in rows
        ]


async def history_times(sessions, device_id: str) -> list[datetime]:  # type: ignore[no-untyped-def]
    async with sessions() as session:
        rows = await session.scalars(
            select(HistoryEntry.time)
            .where(HistoryEntry.device_id == device_id)
            .order_by(HistoryEntry.time)
        )
        return list(rows)


async def pending_changes(sessions, hour: datetime) -> int | None:  # type: ignore[no-untyped-def]
    async with sessions() as session:
        return await session.scalar(select(RollupPending.changes).where(RollupPending.hour == hour))


def summary(stat: dict[str, Any]) -> tuple[Any, ...]:
    return (
        stat["hour"],
        stat["attribute"],
        stat["count"],
        stat["mean"],
        stat["min"],
        stat["max"],
        stat["last"],
        stat["last_time"],
    )


async def test_each_complete_hour_is_rolled_up_per_numeric_attribute(sessions) -> None:  # type: ignore[no-untyped-def]
    meter = unique_id("meter")
    first = three_days_ago()
    second, next_day = first + timedelta(hours=1), first + timedelta(days=1, hours=5)
    now = m.now()
    await write_history(
        sessions,
        meter,
        [
            (first + timedelta(minutes=50), "telemetry", {"power_w": 20.5, "energy_wh": 110}),
            (first + timedelta(minutes=5), "telemetry", {"power_w": 10, "energy_wh": 100}),
            (first + timedelta(minutes=10), "telemetry", {"power_w": 31, "on": True}),
            (first + timedelta(minutes=20), "hello", {"power_w": 999}),  # no attribute values
            (second + timedelta(minutes=30), "state", {"on": False, "power_w": 0}),
            (next_day + timedelta(minutes=1), "telemetry", {"power_w": 7, "mode": "eco"}),
            (now, "telemetry", {"power_w": 1}),  # this hour has not ended: not yet
        ],
    )

    await rollup.run_round(sessions, KEEP, m.now())

    assert [summary(s) for s in await statistics_of(sessions, meter)] == [
        (first, "energy_wh", 2, 105.0, 100.0, 110.0, 110.0, first + timedelta(minutes=50)),
        (first, "power_w", 3, 20.5, 10.0, 31.0, 20.5, first + timedelta(minutes=50)),
        (second, "power_w", 1, 0.0, 0.0, 0.0, 0.0, second + timedelta(minutes=30)),
        (next_day, "power_w", 1, 7.0, 7.0, 7.0, 7.0, next_day + timedelta(minutes=1)),
    ]
    assert await pending_changes(sessions, hour_of(now)) is not None


async def test_rolling_up_again_changes_nothing(sessions) -> None:  # type: ignore[no-untyped-def]
    meter = unique_id("meter")
    hour = three_days_ago() + timedelta(hours=2)
    await write_history(
        sessions,
        meter,
        [
            (hour + timedelta(minutes=i), "telemetry", {"power_w": i, "energy_wh": 10 * i})
            for i in range(6)
        ],
    )
    await rollup.run_round(sessions, KEEP, m.now())
    rolled = await statistics_of(sessions, meter)

    await rollup.run_round(sessions, KEEP, m.now())
    again = await statistics_of(sessions, meter)
    async with sessions.begin() as session:  # the hour marked again, as a resent row would
        await session.execute(rollup.mark_pending(session.bind), [{"hour": hour, "changes": 1}])
    await rollup.run_round(sessions, KEEP, m.now())
    rerun = await statistics_of(sessions, meter)

    assert len(rolled) == 2
    assert rolled == again == rerun  # ids included: an upsert, not new rows
    assert await pending_changes(sessions, hour) is None


async def test_a_row_that_arrives_late_rolls_its_hour_up_again(sessions) -> None:  # type: ignore[no-untyped-def]
    meter = unique_id("meter")
    hour = three_days_ago() + timedelta(hours=3)
    await write_history(
        sessions, meter, [(hour + timedelta(minutes=10), "telemetry", {"power_w": 4})]
    )
    await rollup.run_round(sessions, KEEP, m.now())

    # A device that was offline sends what it measured then.
    await write_history(
        sessions, meter, [(hour + timedelta(minutes=40), "telemetry", {"power_w": 8})]
    )
    await rollup.run_round(sessions, KEEP, m.now())

    [stat] = await statistics_of(sessions, meter)
    assert (stat["count"], stat["mean"], stat["last"]) == (2, 6.0, 8.0)


async def test_an_hour_written_to_while_it_is_rolled_up_stays_pending(sessions) -> None:  # type: ignore[no-untyped-def]
    meter = unique_id("meter")
    hour = three_days_ago() + timedelta(hours=4)
    await write_history(
        sessions, meter, [(hour + timedelta(minutes=1), "telemetry", {"power_w": 1})]
    )
    changes = await pending_changes(sessions, hour)
    assert changes is not None

    # The recorder writes into the hour after the roll-up read its mark.
    await write_history(
        sessions, meter, [(hour + timedelta(minutes=2), "telemetry", {"power_w": 3})]
    )
    await rollup.roll_up_hour(sessions, hour, changes)

    assert await pending_changes(sessions, hour) is not None
    await rollup.run_round(sessions, KEEP, m.now())
    [stat] = await statistics_of(sessions, meter)
    assert (stat["count"], stat["max"]) == (2, 3.0)
    assert await pending_changes(sessions, hour) is None


async def test_raw_history_past_its_keep_goes_only_once_its_hour_is_rolled_up(sessions) -> None:  # type: ignore[no-untyped-def]
    meter = unique_id("meter")
    now = m.now()
    rolled, pending, recent = (
        hour_of(now - timedelta(days=days)) + timedelta(minutes=30) for days in (12, 11, 2)
    )
    await write_history(
        sessions,
        meter,
        [(t, "telemetry", {"energy_wh": i}) for i, t in enumerate((rolled, pending, recent))],
    )
    await rollup.roll_up_hour(
        sessions, hour_of(rolled), await pending_changes(sessions, hour_of(rolled))
    )

    await rollup.prune_history(sessions, KEEP.history_days, now)
    kept_while_pending = await history_times(sessions, meter)
    await rollup.run_round(sessions, KEEP, now)

    assert kept_while_pending == [pending, recent]
    assert await history_times(sessions, meter) == [recent]
    assert [s["last"] for s in await statistics_of(sessions, meter)] == [0.0, 1.0, 2.0]


async def test_statistics_past_their_keep_are_deleted_and_the_audit_chain_holds(
    sessions,
) -> None:  # type: ignore[no-untyped-def]
    meter = unique_id("meter")
    now = m.now()
    async with sessions.begin() as session:
        for days in (800, 700):
            hour = hour_of(now - timedelta(days=days))
            session.add(
                HourlyStatistic(
                    device_id=meter,
                    hour=hour,
                    attribute="energy_wh",
                    count=1,
                    mean=1.0,
                    min=1.0,
                    max=1.0,
                    last=1.0,
                    last_time=hour,
                )
            )

    # The audit log's retention (behind a signed checkpoint) is test_recorder_audit's.
    report = await rollup.run_round(sessions, KEEP, now, audit_key=AUDIT_KEY)

    assert [s["hour"] for s in await statistics_of(sessions, meter)] == [
        hour_of(now - timedelta(days=700))
    ]
    assert report.statistics_deleted >= 1
    assert (await audit.verify(sessions, AUDIT_KEY)).ok


async def test_the_api_pages_through_a_devices_statistics_oldest_first(
    client: AsyncTestClient, sessions
) -> None:  # type: ignore[no-untyped-def]
    meter = unique_id("meter")
    created = await client.post(
        "/api/v1/devices", json={"id": meter, "name": "Meter", "kind": "energy_meter"}
    )
    assert created.status_code == 201, created.text
    first = three_days_ago() + timedelta(hours=5)
    hours = [first + timedelta(hours=i) for i in range(3)]
    await write_history(
        sessions,
        meter,
        [
            (h + timedelta(minutes=15), "telemetry", {"power_w": i, "energy_wh": 100 + i})
            for i, h in enumerate(hours)
        ],
    )
    await rollup.run_round(sessions, KEEP, m.now())
    url = f"/api/v1/devices/{meter}/statistics"

    page_one = (await client.get(url, params={"limit": "4"})).json()
    page_two = (
        await client.get(url, params={"limit": "4", "cursor": page_one["next_cursor"]})
    ).json()
    power = (await client.get(url, params={"attribute": "power_w"})).json()
    window = await client.get(
        url, params={"since": hours[1].isoformat(), "until": hours[2].isoformat()}
    )

    items = page_one["items"] + page_two["items"]
    assert [(i["hour"], i["attribute"]) for i in items] == [
        (h.isoformat().replace("+00:00", "Z"), a) for h in hours for a in ("energy_wh", "power_w")
    ]
    assert (len(page_one["items"]), page_two["next_cursor"]) == (4, None)
    assert items[-1] | {"hour": None, "last_time": None} == {
        "hour": None,
        "attribute": "power_w",
        "count": 1,
        "mean": 2.0,
        "min": 2.0,
        "max": 2.0,
        "last": 2.0,
        "last_time": None,
    }
    assert [i["last"] for i in power["items"]] == [0.0, 1.0, 2.0]
    assert [i["attribute"] for i in window.json()["items"]] == ["energy_wh", "power_w"]


async def test_the_recorder_marks_the_hours_it_writes_for_a_roll_up(
    service_env, data_dir, js, sessions
) -> None:  # type: ignore[no-untyped-def]
    meter = unique_id("meter")
    hour = three_days_ago() + timedelta(hours=6)
    for minute, power in ((10, 2.0), (20, 4.0)):
        event = m.make_event(meter, "telemetry", {"power_w": power})
        event = msgspec.structs.replace(event, time=hour + timedelta(minutes=minute))
        await bus.publish(js, event.nats_subject, event, msg_id=event.id)
    recorder = Service("services.recorder", service_env, data_dir).start()
    try:
        await eventually(lambda: _n_rows(history_times(sessions, meter), 2), timeout=15)
    finally:
        recorder.stop()

    await rollup.run_round(sessions, KEEP, m.now())

    [stat] = await statistics_of(sessions, meter)
    assert (stat["hour"], stat["count"], stat["mean"]) == (hour, 2, 3.0)


async def _n_rows(found, n: int):  # type: ignore[no-untyped-def]
    rows = await found
    assert len(rows) >= n, rows
    return rows


async def test_a_failed_round_is_logged_and_tried_again(
    tmp_path, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'smarthome.db'}")
    stop = asyncio.Event()
    caplog.set_level(logging.WARNING, logger=rollup.__name__)
    job = asyncio.create_task(
        rollup.rollup_forever(make_sessionmaker(engine), KEEP, stop, AUDIT_KEY)
    )
    try:
        await eventually(lambda: "statistics roll-up failed" in caplog.text, timeout=10)
        assert not job.done()
    finally:
        stop.set()
        await asyncio.wait_for(job, 5)  # ends on stop, without raising
        await engine.dispose()


async def test_no_statistics_means_an_empty_page(client: AsyncTestClient, sessions) -> None:  # type: ignore[no-untyped-def]
    meter = unique_id("meter")
    await client.post(
        "/api/v1/devices", json={"id": meter, "name": "Meter", "kind": "energy_meter"}
    )
    async with sessions() as session:
        assert (
            await session.scalar(select(func.count()).where(HourlyStatistic.device_id == meter))
            == 0
        )

    response = await client.get(f"/api/v1/devices/{meter}/statistics")

    assert response.json() == {"items": [], "next_cursor": None}
