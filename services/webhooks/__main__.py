"""`python -m services.webhooks`: signed webhook delivery."""

from __future__ import annotations

import asyncio

from libs import bus, runtime, subjects, webhooks
from libs.homes import HomeIndex
from libs.lease import Lease
from services.webhooks.dispatcher import LEASE_KEY, Dispatcher
from services.webhooks.store import DeliveryStore


async def work(p: runtime.Process) -> None:
    hooks = webhooks.WebhookSettings.of(p.settings)
    # Which home each message is about, for the subscriptions of one home.
    homes = HomeIndex()
    try:
        await homes.start(p.nc, p.sessions, must_load=False)
        store = DeliveryStore(p.sessions)
        dispatcher = Dispatcher(p.nc, store, hooks, Lease(p.js, LEASE_KEY), homes)
        p.ready_when(dispatcher)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(homes.keep_current(p.stop))
            await dispatcher.run(p.stop)
    finally:
        await homes.stop()


if __name__ == "__main__":
    runtime.serve("webhooks", work, needs=[(subjects.SYSTEM_STREAM, bus.WEBHOOKS_NOTIFY_DURABLE)])
