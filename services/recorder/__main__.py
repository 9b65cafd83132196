"""`python -m services.recorder`: history, audit, rule traces and hourly statistics."""

from __future__ import annotations

import asyncio
import contextlib

from libs import bus, runtime
from libs.db.engine import make_engine, make_sessionmaker
from libs.settings import Settings
from services.recorder.retention import prune_forever
from services.recorder.rollup import Keep, rollup_forever
from services.recorder.writer import SOURCES, StreamRecorder


async def main(settings: Settings, stop: asyncio.Event) -> None:
    engine = make_engine(settings.effective_database_url)
    nc = await bus.connect(
        settings.effective_nats_url,
        "recorder",
        settings.nats_user,
        settings.nats_password,
        ca=settings.nats_tls_ca,
    )
    js = nc.jetstream()
    await bus.wait_provisioned(
        js, [(s, bus.recorder_durable(s)) for s in bus.RECORDER_SOURCES], stop
    )

    health = await runtime.serve_health(settings, runtime.bus_and_database(nc, engine))
    try:
        async with asyncio.TaskGroup() as tasks:
            for stream in SOURCES:
                tasks.create_task(StreamRecorder(nc, engine, stream).run(stop))
            sessions = make_sessionmaker(engine)
            keep, days = settings.rule_traces_keep, settings.rule_traces_days
            tasks.create_task(prune_forever(sessions, keep, days, stop))
            retention = Keep(
                settings.history_keep_days,
                settings.statistics_keep_days,
                settings.audit_keep_days,
            )
            tasks.create_task(rollup_forever(sessions, retention, stop))
    finally:
        if health:
            health.close()
        with contextlib.suppress(Exception):
            await nc.drain()
        await engine.dispose()


if __name__ == "__main__":
    runtime.run("recorder", main)
