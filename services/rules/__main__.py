"""`python -m services.rules`: the rules engine."""

from __future__ import annotations

import asyncio
import contextlib

from libs import runtime, subjects
from services.rules.partitions import Partitions

RELOAD_EVERY_S = 30.0


async def work(p: runtime.Process) -> None:
    rules = Partitions(p.nc, p.js, p.sessions, p.settings.rules_partitions)
    p.ready_when(rules)

    async def reload_periodically() -> None:
        while not p.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(p.stop.wait(), RELOAD_EVERY_S)
            if not p.stop.is_set():
                with contextlib.suppress(Exception):
                    await rules.reload_rules()

    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(rules.run(p.stop))
        tasks.create_task(reload_periodically())


if __name__ == "__main__":
    runtime.serve(
        "rules", work, needs=[(subjects.SYSTEM_STREAM, None), (subjects.EVENTS_STREAM, None)]
    )
