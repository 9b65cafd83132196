"""`python -m services.webhooks`: signed webhook delivery."""

from __future__ import annotations

import asyncio
import contextlib

from libs import bus, runtime, webhooks
from libs.db.engine import make_engine, make_sessionmaker
from libs.lease import Lease
from libs.settings import Settings
from services.webhooks.dispatcher import LEASE_KEY, Dispatcher
from services.webhooks.store import DeliveryStore


async def main(settings: Settings, stop: asyncio.Event) -> None:
    hooks = webhooks.WebhookSettings.of(settings)
    engine = make_engine(settings.effective_database_url)
    nc = await bus.connect(settings.effective_nats_url, "webhooks")
    js = nc.jetstream()
    await bus.ensure_streams(js, settings.stream_replicas)

    async def ready() -> str | None:
        return None if nc.is_connected else "bus unreachable"

    health = await runtime.serve_health(settings, ready)
    try:
        dispatcher = Dispatcher(
            nc,
            js,
            DeliveryStore(make_sessionmaker(engine)),
            hooks,
            Lease(js, LEASE_KEY),
        )
        await dispatcher.run(stop)
    finally:
        if health:
            health.close()
        with contextlib.suppress(Exception):
            await nc.drain()
        await engine.dispose()


if __name__ == "__main__":
    runtime.run("webhooks", main)
