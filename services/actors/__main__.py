"""`python -m services.actors`: the device actors worker."""

from __future__ import annotations

import asyncio
import contextlib

from libs import bus, runtime, subjects
from libs.cache import make_cache
from libs.db.engine import make_engine, make_sessionmaker
from libs.lease import Lease
from libs.settings import Settings
from services.actors.presence import scan_forever
from services.actors.store import StateStore
from services.actors.worker import ActorWorker


async def main(settings: Settings, stop: asyncio.Event) -> None:
    engine = make_engine(settings.effective_database_url)
    cache = make_cache(settings.redis_url)
    nc = await bus.connect(
        settings.effective_nats_url,
        "actors",
        settings.nats_user,
        settings.nats_password,
        ca=settings.nats_tls_ca,
    )
    js = nc.jetstream()
    await bus.wait_provisioned(js, [(subjects.EVENTS_STREAM, bus.ACTORS_DURABLE)], stop)
    sessions = make_sessionmaker(engine)

    health = await runtime.serve_health(settings, runtime.bus_and_database(nc, engine))
    try:
        async with asyncio.TaskGroup() as tasks:
            worker = ActorWorker(nc, StateStore(sessions, cache), Lease(js, "actors"))
            tasks.create_task(worker.run(stop))
            tasks.create_task(scan_forever(js, sessions, settings.heartbeat_timeout_s, stop))
    finally:
        if health:
            health.close()
        with contextlib.suppress(Exception):
            await nc.drain()
        await cache.close()
        await engine.dispose()


if __name__ == "__main__":
    runtime.run("actors", main)
