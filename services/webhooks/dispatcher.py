"""One worker task per subscription, while this process holds the `webhooks` lease.

Two webhooks processes never deliver the same subscription: the lease makes one active and
the others hot standbys. The set of workers follows the `subscriptions` table: reloaded on
`system.subscription.<id>.changed` and every RELOAD_EVERY_S (a notice sent while nobody
listened is caught up with).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from libs import webhooks
from libs.lease import Lease
from services.webhooks.sender import Sender
from services.webhooks.store import DeliveryStore
from services.webhooks.worker import SubscriptionWorker

log = logging.getLogger(__name__)

LEASE_KEY = "webhooks"
RELOAD_EVERY_S = 30.0
# On stop, a delivery in flight may finish for this long before it is cancelled (and naked).
STOP_GRACE_S = 2.0


class Dispatcher:
    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        store: DeliveryStore,
        sender: Sender,
        settings: webhooks.WebhookSettings,
        lease: Lease,
    ) -> None:
        self._nc = nc
        self._js = js
        self._store = store
        self._sender = sender
        self._settings = settings
        self._lease = lease
        self._rng = random.Random()
        # Each worker with its task and the event that asks it to stop.
        self._workers: dict[str, tuple[SubscriptionWorker, asyncio.Task[None], asyncio.Event]] = {}
        self._changed = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver while this process holds the lease; stand by while another one does."""
        watch = await self._nc.subscribe(webhooks.SUBSCRIPTIONS_CHANGED_ALL, cb=self._on_change)
        try:
            while await self._lease.acquire(stop):
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(self._lease.keep(stop))
                    tasks.create_task(self._dispatch(stop))
        finally:
            await self._lease.release()
            with contextlib.suppress(Exception):
                await watch.unsubscribe()

    async def _on_change(self, msg: Msg) -> None:
        with contextlib.suppress(ValueError):
            entry = self._workers.get(webhooks.parse_subscription_changed(msg.subject))
            if entry:
                entry[0].redrive.set()
        self._changed.set()

    async def _dispatch(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        next_reload = loop.time()
        try:
            while not stop.is_set() and self._lease.held.is_set():
                if self._changed.is_set() or loop.time() >= next_reload:
                    self._changed.clear()
                    periodic = loop.time() >= next_reload
                    try:
                        await self._reload(redrive=periodic)
                        next_reload = loop.time() + RELOAD_EVERY_S
                    except Exception as exc:  # the database is down: try again shortly
                        log.warning("subscriptions reload failed: %s", exc)
                        next_reload = loop.time() + 1.0
                # Woken by a notice; otherwise look at stop and the lease every second.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 1.0)
        finally:
            await self._stop_workers(list(self._workers))

    async def _reload(self, redrive: bool) -> None:
        """Start a worker per new subscription, stop those of deleted or changed ones."""
        targets = await self._store.targets()
        gone = [
            sid
            for sid, (worker, task, _) in self._workers.items()
            if targets.get(sid) != worker.target or task.done()
        ]
        await self._stop_workers(gone)
        started = 0
        for sid, target in targets.items():
            if sid in self._workers:
                if redrive:  # a re-drive notice may have been sent while nobody listened
                    self._workers[sid][0].redrive.set()
                continue
            worker = SubscriptionWorker(
                target, self._js, self._store, self._sender, self._settings, self._rng
            )
            quit_ = asyncio.Event()
            task = asyncio.create_task(worker.run(quit_), name=f"webhook-{sid}")
            task.add_done_callback(_log_crash)
            self._workers[sid] = (worker, task, quit_)
            started += 1
        if gone or started:
            log.info("delivering %d subscription(s)", len(self._workers))

    async def _stop_workers(self, ids: list[str]) -> None:
        """Ask the workers to stop; cancel those still in a delivery after a grace period."""
        stopping = [self._workers.pop(sid) for sid in ids if sid in self._workers]
        if not stopping:
            return
        for _, _, quit_ in stopping:
            quit_.set()
        tasks = [task for _, task, _ in stopping]
        _, pending = await asyncio.wait(tasks, timeout=STOP_GRACE_S)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error(
            "%s stopped: %r (restarted on the next reload)", task.get_name(), task.exception()
        )
