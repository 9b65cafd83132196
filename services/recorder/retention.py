"""Retention: each rule keeps its newest N traces, none older than D days; rows older than a
cutoff are deleted a chunk at a time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import messages as m
from libs.db.models import RuleRun

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 60.0
DELETE_CHUNK = 5000


async def delete_before(
    sessions: async_sessionmaker[AsyncSession], column: Any, cutoff: datetime
) -> int:
    """Delete the rows whose `column` is before `cutoff`, a chunk per transaction: one long
    delete would hold SQLite's write lock, and the recorder's writes wait on it."""
    table = column.table
    deleted = 0
    while True:
        chunk = select(table.c.id).where(column < cutoff).limit(DELETE_CHUNK)
        async with sessions.begin() as session:
            result = await session.execute(delete(table).where(table.c.id.in_(chunk)))
        deleted += result.rowcount or 0
        if (result.rowcount or 0) < DELETE_CHUNK:
            return deleted


async def prune_traces(sessions: async_sessionmaker[AsyncSession], keep: int, days: float) -> int:
    """Delete runs beyond the newest `keep` per rule and runs older than `days`."""
    ranked = select(
        RuleRun.id,
        func.row_number()
        .over(partition_by=RuleRun.rule_id, order_by=RuleRun.id.desc())
        .label("rank"),
    ).subquery()
    surplus = select(ranked.c.id).where(ranked.c.rank > keep)
    cutoff = m.now() - timedelta(days=days)
    async with sessions.begin() as session:
        old = await session.execute(delete(RuleRun).where(RuleRun.time < cutoff))
        extra = await session.execute(delete(RuleRun).where(RuleRun.id.in_(surplus)))
    return (old.rowcount or 0) + (extra.rowcount or 0)


async def prune_forever(
    sessions: async_sessionmaker[AsyncSession], keep: int, days: float, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        try:
            removed = await prune_traces(sessions, keep, days)
            if removed:
                log.info("pruned %d rule traces", removed)
        except Exception as exc:  # the next round tries again
            log.warning("trace pruning failed: %s", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), PRUNE_EVERY_S)
