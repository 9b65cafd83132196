"""The recorder's history write (`services.recorder.bulk`: one statement on Postgres, plain
tuples on SQLite): idempotent on redelivery, the same rows as the ORM statements, inside
the batch's transaction, a refusal told from an outage."""

from __future__ import annotations

import os
import random
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from libs import messages as m
from libs import subjects
from libs.consumer import Delivery, Item
from libs.db.engine import insert_ignoring_duplicates, refused
from libs.db.models import HistoryEntry, RollupPending
from services.recorder import bulk, rollup
from services.recorder.writer import StreamRecorder
from tests.helpers import unique_id

POSTGRES = os.environ.get("DATABASE_URL", "").startswith("postgresql")
# An hour of its own (no other test writes history there), and an offset that is no whole hour.
HOUR = datetime(2001, 2, 3, 4, tzinfo=UTC) + timedelta(hours=random.randrange(10_000))
PLUS_0530 = timezone(timedelta(hours=5, minutes=30))
DATA = {"temperature": 21.5, "big": 10**17, "tiny": 1e-7, "name": 'Küche "é" ✓', "on": True}


def _seqs(n: int) -> list[int]:
    """Stream sequences no other test uses (the history's key is stream and sequence)."""
    base = random.randrange(10**12, 10**15)
    return list(range(base, base + n))


def _item(device_id: str, seq: int, time: datetime, data: dict) -> Item:  # type: ignore[type-arg]
    event = m.CloudEvent(
        id=unique_id("evt"),
        source=f"device/{device_id}",
        type="telemetry",
        subject=device_id,
        specversion="1.0",
        time=time,
        data=data,
    )
    delivery = Delivery(
        subjects.device_events(device_id, "telemetry"),
        m.encode(event),
        None,
        subjects.EVENTS_STREAM,
        seq,
        m.now(),
    )
    return Item(delivery, None)


async def _recorder(nc, sessions) -> StreamRecorder:  # type: ignore[no-untyped-def]
    return StreamRecorder(nc, sessions.kw["bind"], subjects.EVENTS_STREAM)


def _decoded(recorder: StreamRecorder, items: list[Item]) -> list[Item]:  # type: ignore[type-arg]
    return [Item(i.delivery, recorder.decode(i.delivery)) for i in items]


async def _history(sessions, device_id: str) -> list[tuple]:  # type: ignore[no-untyped-def]
    async with sessions() as session:
        found = await session.execute(
            select(
                HistoryEntry.device_id,
                HistoryEntry.time,
                HistoryEntry.type,
                HistoryEntry.data,
                HistoryEntry.stream,
                HistoryEntry.source_seq,
            )
            .where(HistoryEntry.device_id == device_id)
            .order_by(HistoryEntry.source_seq)
        )
        return [tuple(r) for r in found]


async def _pending(sessions, hours: list[datetime]) -> dict[datetime, int]:  # type: ignore[no-untyped-def]
    async with sessions() as session:
        found = await session.execute(
            select(RollupPending.hour, RollupPending.changes).where(RollupPending.hour.in_(hours))
        )
        return {hour: changes for hour, changes in found}


async def test_a_redelivered_batch_writes_each_row_once(nc, sessions) -> None:  # type: ignore[no-untyped-def]
    recorder = await _recorder(nc, sessions)
    device = unique_id("meter")
    seqs = _seqs(6)
    # Two hours, one time given at +05:30.
    times = [HOUR + timedelta(minutes=10 * k) for k in range(3)]
    times += [(HOUR + timedelta(hours=1, minutes=k)).astimezone(PLUS_0530) for k in range(3)]
    items = [
        _item(device, s, t, {**DATA, "n": k})
        for k, (s, t) in enumerate(zip(seqs, times, strict=True))
    ]
    before = await _pending(sessions, [HOUR, HOUR + timedelta(hours=1)])

    assert await recorder.handle(_decoded(recorder, items[:4])) == {}
    assert await recorder.handle(_decoded(recorder, items[:4])) == {}  # the same, redelivered
    assert await recorder.handle(_decoded(recorder, items[2:])) == {}  # half old, half new

    rows = await _history(sessions, device)
    assert [r[5] for r in rows] == seqs
    assert [r[1] for r in rows] == [t.astimezone(UTC) for t in times]
    assert [r[3] for r in rows] == [{**DATA, "n": k} for k in range(6)]
    assert {(r[0], r[2], r[4]) for r in rows} == {(device, "telemetry", "EVENTS")}
    # Each write marks each of its hours once more, redelivered or not.
    marked = await _pending(sessions, [HOUR, HOUR + timedelta(hours=1)])
    assert marked[HOUR] - before.get(HOUR, 0) == 3
    assert marked[HOUR + timedelta(hours=1)] - before.get(HOUR + timedelta(hours=1), 0) == 3


async def test_the_same_rows_as_the_orm_statements(nc, sessions) -> None:  # type: ignore[no-untyped-def]
    """What the recorder writes (on Postgres, `bulk`) reads back as the ORM's rows do."""
    recorder = await _recorder(nc, sessions)
    ours, orm = unique_id("meter"), unique_id("meter")
    times = [HOUR + timedelta(seconds=7), (HOUR + timedelta(minutes=59)).astimezone(PLUS_0530)]
    seqs = _seqs(4)
    items = [_item(ours, s, t, DATA) for s, t in zip(seqs[:2], times, strict=True)]
    assert await recorder.handle(_decoded(recorder, items)) == {}
    decoded = _decoded(
        recorder, [_item(orm, s, t, DATA) for s, t in zip(seqs[2:], times, strict=True)]
    )
    engine = sessions.kw["bind"]
    async with sessions.begin() as session:
        history = [row for i in decoded for row in i.value.history]
        await session.execute(insert_ignoring_duplicates(engine, HistoryEntry.__table__), history)
        await session.execute(rollup.mark_pending(engine), rollup.pending_hours(history))

    def without_device_and_seq(rows: list[tuple]) -> list[tuple]:  # type: ignore[type-arg]
        return [(r[1], r[2], r[3], r[4]) for r in rows]

    written, expected = await _history(sessions, ours), await _history(sessions, orm)
    assert len(written) == 2
    assert without_device_and_seq(written) == without_device_and_seq(expected)


async def test_the_statement_runs_in_the_batch_transaction(sessions) -> None:  # type: ignore[no-untyped-def]
    device = unique_id("meter")
    row = {
        "device_id": device,
        "time": HOUR,
        "type": "telemetry",
        "data": DATA,
        "stream": "EVENTS",
        "source_seq": _seqs(1)[0],
    }
    with pytest.raises(RuntimeError):
        async with sessions.begin() as session:
            await bulk.HistoryWriter(sessions.kw["bind"]).write(session, [row])
            raise RuntimeError("the batch failed after its history")
    assert await _history(sessions, device) == []


def test_the_statements_name_every_history_column_but_the_id() -> None:
    columns = {c.name for c in HistoryEntry.__table__.columns if not c.primary_key}
    assert set(bulk.HISTORY_COLUMNS) == columns
    into = f"INSERT INTO history ({', '.join(bulk.HISTORY_COLUMNS)})"
    assert into in bulk.POSTGRES_STATEMENT
    assert into in bulk.SQLITE_STATEMENT


@pytest.mark.skipif(not POSTGRES, reason="the one-statement write is Postgres's")
async def test_what_postgres_refuses_is_a_refusal_as_from_any_statement(sessions) -> None:  # type: ignore[no-untyped-def]
    """As `StreamRecorder.handle` tells them apart: refused (dead-letter) or down (retry)."""
    row = {
        "device_id": "x" * 129,  # the column holds 128 (a subject's token cannot be longer)
        "time": HOUR,
        "type": "telemetry",
        "data": DATA,
        "stream": "EVENTS",
        "source_seq": _seqs(1)[0],
    }
    with pytest.raises(DBAPIError) as refusal:
        async with sessions.begin() as session:
            await bulk.HistoryWriter(sessions.kw["bind"]).write(session, [row])
    assert refused(refusal.value)
