"""`python -m services.rules`: the rules engine."""

from __future__ import annotations

import asyncio
import contextlib

from libs import bus, runtime, subjects
from libs.db.engine import make_engine, make_sessionmaker
from libs.settings import Settings
from services.rules.partitions import Partitions

RELOAD_EVERY_S = 30.0


async def main(settings: Settings, stop: asyncio.Event) -> None:
    engine = make_engine(settings.effective_database_url)
    nc = await bus.connect(
        settings.effective_nats_url,
        "rules",
        settings.nats_user,
        settings.nats_password,
        ca=settings.nats_tls_ca,
    )
    js = nc.jetstream()
    await bus.wait_provisioned(
        js, [(subjects.SYSTEM_STREAM, None), (subjects.EVENTS_STREAM, None)], stop
    )
    rules = Partitions(nc, js, make_sessionmaker(engine), settings.rules_partitions)

    async def reload_periodically() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RELOAD_EVERY_S)
            if not stop.is_set():
                with contextlib.suppress(Exception):
                    await rules.reload_rules()

    health = await runtime.serve_health(settings, runtime.bus_and_database(nc, engine))
    try:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(rules.run(stop))
            tasks.create_task(reload_periodically())
    finally:
        if health:
            health.close()
        with contextlib.suppress(Exception):
            await nc.drain()
        await engine.dispose()


if __name__ == "__main__":
    runtime.run("rules", main)
