"""The recorder's database side: trace retention by count and age, per rule."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select

from libs import messages as m
from libs.db.models import RuleRun
from services.recorder.retention import prune_traces
from tests.helpers import unique_id


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
