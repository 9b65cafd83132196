"""`python -m services.recorder`: history, audit, rule traces and hourly statistics."""

from __future__ import annotations

import asyncio

from libs import bus, runtime
from libs.db import audit
from services.recorder.retention import prune_forever
from services.recorder.rollup import Keep, rollup_forever
from services.recorder.writer import SOURCES, StreamRecorder


async def work(p: runtime.Process) -> None:
    s = p.settings
    recorders = [StreamRecorder(p.nc, p.engine, stream) for stream in SOURCES]
    p.ready_when(*(r.consumer for r in recorders))
    retention = Keep(s.history_keep_days, s.statistics_keep_days, s.audit_keep_days)
    async with asyncio.TaskGroup() as tasks:
        for recorder in recorders:
            tasks.create_task(recorder.run(p.stop))
        tasks.create_task(prune_forever(p.sessions, s.rule_traces_keep, s.rule_traces_days, p.stop))
        tasks.create_task(
            rollup_forever(p.sessions, retention, p.stop, audit_key=audit.checkpoint_key(s))
        )


if __name__ == "__main__":
    runtime.serve(
        "recorder", work, needs=[(s, bus.recorder_durable(s)) for s in bus.RECORDER_SOURCES]
    )
