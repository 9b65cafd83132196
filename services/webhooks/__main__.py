"""`python -m services.webhooks`: signed webhook delivery."""

from __future__ import annotations

import asyncio
import contextlib

from libs import bus, runtime, subjects, webhooks
from libs.db.engine import make_engine, make_sessionmaker
from libs.homes import HomeIndex
from libs.lease import Lease
from libs.settings import Settings
from services.webhooks.dispatcher import LEASE_KEY, Dispatcher
from services.webhooks.store import DeliveryStore


async def main(settings: Settings, stop: asyncio.Event) -> None:
    hooks = webhooks.WebhookSettings.of(settings)
    engine = make_engine(settings.effective_database_url)
    nc = await bus.connect(
        settings.effective_nats_url,
        "webhooks",
        settings.nats_user,
        settings.nats_password,
        ca=settings.nats_tls_ca,
    )
    js = nc.jetstream()
    await bus.wait_provisioned(js, [(subjects.SYSTEM_STREAM, bus.WEBHOOKS_NOTIFY_DURABLE)], stop)

    health = await runtime.serve_health(settings, runtime.bus_and_database(nc, engine))
    sessions = make_sessionmaker(engine)
    # Which home each message is about, for the subscriptions of one home.
    homes = HomeIndex()
    try:
        await homes.start(nc, sessions, must_load=False)
        dispatcher = Dispatcher(nc, js, DeliveryStore(sessions), hooks, Lease(js, LEASE_KEY), homes)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(homes.keep_current(stop))
            await dispatcher.run(stop)
    finally:
        await homes.stop()
        if health:
            health.close()
        with contextlib.suppress(Exception):
            await nc.drain()
        await engine.dispose()


if __name__ == "__main__":
    runtime.run("webhooks", main)
