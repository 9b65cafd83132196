"""Hourly statistics and the retention of history, statistics and audit.

Every few minutes: each complete hour (ended `GRACE` ago) whose history changed is rolled
up again from its raw rows, an upsert per device, hour and attribute, one transaction per
hour; then rows past their keep are deleted. Raw history goes only up to the oldest hour
still pending, so nothing is deleted before it is counted.

The recorder marks an hour pending (`rollup_pending`) in the transaction that writes its
history: rows that arrive late (a device's buffered readings, the backlog of an outage) mark
their hour again and it is rolled up again. A roll-up clears the mark only if no write
changed it meanwhile; a crash before the commit leaves the hour pending, as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from dataclasses import astuple, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from libs import messages as m
from libs import settings
from libs.db import audit
from libs.db.engine import dialect_insert, upsert
from libs.db.models import HistoryEntry, HourlyStatistic, RollupPending
from services.recorder.hourly import HOUR, ROLLED_UP_TYPES, HourTally, hour_of, hours_of
from services.recorder.retention import delete_before

log = logging.getLogger(__name__)

ROLLUP_EVERY_S = 300.0
GRACE = timedelta(minutes=10)  # late rows of an hour are in by then (later ones roll it again)
STATISTIC_KEY = ("device_id", "hour", "attribute")
READ_ROWS = 1000  # history rows fetched at a time while rolling an hour up
WRITE_ROWS = 500  # statistics rows per upsert


@dataclass(frozen=True)
class Keep:
    """How many days each kind of row is kept."""

    history_days: float
    statistics_days: float
    audit_days: float


@dataclass
class Report:
    """What one round did."""

    hours: int = 0
    statistics: int = 0
    history_deleted: int = 0
    statistics_deleted: int = 0
    audit_deleted: int = 0


def mark_pending(engine: AsyncEngine) -> Any:
    """The statement that marks hours pending; its values are `pending_hours(history)`."""
    table = RollupPending.__table__
    return dialect_insert(engine, table).on_conflict_do_update(
        index_elements=["hour"], set_={"changes": table.c.changes + 1}
    )


def pending_hours(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"hour": hour, "changes": 1} for hour in hours_of(history)]


async def rollup_forever(
    sessions: async_sessionmaker[AsyncSession],
    keep: Keep,
    stop: asyncio.Event,
    audit_key: bytes | None = None,
) -> None:
    """`audit_key` signs the audit chain's retention checkpoints (`audit.checkpoint_key`);
    without one, it is derived from the settings of this process's environment."""
    key = audit_key if audit_key is not None else audit.checkpoint_key(settings.load())
    while not stop.is_set():
        try:
            report = await run_round(sessions, keep, m.now(), stop, key)
            if any(astuple(report)):
                log.info(
                    "rolled up %d hours into %d statistics; deleted %d history, "
                    "%d statistics and %d audit rows",
                    *astuple(report),
                )
        except Exception as exc:  # the database is down, say: the next round tries again
            log.warning("statistics roll-up failed: %s", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), ROLLUP_EVERY_S)


async def run_round(
    sessions: async_sessionmaker[AsyncSession],
    keep: Keep,
    now: datetime,
    stop: asyncio.Event | None = None,
    audit_key: bytes | None = None,
) -> Report:
    """Roll up what is pending, then delete what is past its keep (the audit log only with
    `audit_key` to sign where its chain is cut)."""
    report = Report()
    report.hours, report.statistics = await roll_up(sessions, now, stop)
    report.history_deleted = await prune_history(sessions, keep.history_days, now)
    report.statistics_deleted = await delete_before(
        sessions, HourlyStatistic.hour, now - timedelta(days=keep.statistics_days)
    )
    if audit_key is not None:
        cut = await audit.cut_before(sessions, audit_key, now - timedelta(days=keep.audit_days))
        report.audit_deleted = cut.deleted
    return report


async def roll_up(
    sessions: async_sessionmaker[AsyncSession], now: datetime, stop: asyncio.Event | None = None
) -> tuple[int, int]:
    """Roll up each complete pending hour once, oldest first: (hours, statistics rows)."""
    hours = rows = 0
    after = None
    while stop is None or not stop.is_set():
        pending = await _next_pending(sessions, after, latest=now - HOUR - GRACE)
        if pending is None:
            break
        hour, changes = pending
        rows += await roll_up_hour(sessions, hour, changes)
        hours += 1
        after = hour  # once per round, even if a write marks it again meanwhile
    return hours, rows


async def _next_pending(
    sessions: async_sessionmaker[AsyncSession], after: datetime | None, latest: datetime
) -> tuple[datetime, int] | None:
    """The oldest pending hour after `after` that starts at or before `latest`, with the
    number of changes marked on it."""
    query = (
        select(RollupPending.hour, RollupPending.changes)
        .where(RollupPending.hour <= latest)
        .order_by(RollupPending.hour)
        .limit(1)
    )
    if after is not None:
        query = query.where(RollupPending.hour > after)
    async with sessions() as session:
        found = (await session.execute(query)).first()
    return None if found is None else (found.hour, found.changes)


async def roll_up_hour(
    sessions: async_sessionmaker[AsyncSession], hour: datetime, changes: int
) -> int:
    """Compute `hour`'s statistics from its history, upsert them and clear its mark, in one
    transaction. `changes` was read before the history: if a write has marked the hour
    since, the mark stays and the hour is rolled up again next round."""
    tally = HourTally(hour)
    async with sessions.begin() as session:
        history = await session.stream(_history_of(hour))
        async for device_id, time, data in history:
            tally.add(device_id, time, data)
        rows = tally.rows()
        statement = upsert(session.get_bind(), HourlyStatistic.__table__, STATISTIC_KEY)
        while chunk := list(itertools.islice(rows, WRITE_ROWS)):
            await session.execute(statement, chunk)
        await session.execute(
            delete(RollupPending).where(
                RollupPending.hour == hour, RollupPending.changes == changes
            )
        )
    return len(tally)


def _history_of(hour: datetime) -> Any:
    entry = HistoryEntry
    return (
        select(entry.device_id, entry.time, entry.data)
        .where(entry.time >= hour, entry.time < hour + HOUR, entry.type.in_(ROLLED_UP_TYPES))
        .order_by(entry.time, entry.id)
        .execution_options(yield_per=READ_ROWS)
    )


async def prune_history(
    sessions: async_sessionmaker[AsyncSession], days: float, now: datetime
) -> int:
    """Delete raw history of the hours that ended `days` ago, up to the oldest pending hour."""
    cutoff = hour_of(now - timedelta(days=days))
    async with sessions() as session:
        oldest_pending = await session.scalar(select(func.min(RollupPending.hour)))
    if oldest_pending is not None:
        cutoff = min(cutoff, oldest_pending)
    return await delete_before(sessions, HistoryEntry.time, cutoff)
