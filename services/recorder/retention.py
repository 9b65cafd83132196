"""Trace retention: each rule keeps its newest N runs, none older than D days."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import messages as m
from libs.db.models import RuleRun

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 60.0


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
