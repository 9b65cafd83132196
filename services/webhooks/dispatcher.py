"""One task per subscription (a worker for its filter, one for the notifications addressed
to it, and its delivered counter), while this process holds the `webhooks` lease; and the check
that dead-letters notifications addressed to no subscription.

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

from libs import bus, subjects, webhooks
from libs.homes import HomeIndex
from libs.lease import Lease
from services.webhooks.channels import ChannelSender
from services.webhooks.counter import DeliveredCounter
from services.webhooks.notifications import NotificationCheck
from services.webhooks.sender import Sender, Sends, make_session
from services.webhooks.store import DeliveryStore, Target
from services.webhooks.worker import SourceWorker, sources

log = logging.getLogger(__name__)

LEASE_KEY = "webhooks"
RELOAD_EVERY_S = 30.0
# On stop, a delivery in flight may finish for this long before it is cancelled (and naked).
STOP_GRACE_S = 2.0


class SubscriptionDelivery:
    """A subscription's workers, sharing its HTTP session (keep-alive connections to its
    endpoint) and its delivered counter; or a notification channel's one worker, which sends
    through the channel's kind. Made by the dispatcher, inside the running loop."""

    def __init__(
        self,
        target: Target,
        nc: NATS,
        store: DeliveryStore,
        settings: webhooks.WebhookSettings,
        rng: random.Random,
        homes: HomeIndex | None = None,
        partition_first: bool = True,
    ) -> None:
        self.target = target
        private = target.allow_private_targets
        self._session = make_session(settings, allow_private_targets=private)
        self._counter = DeliveredCounter(store, target.id)
        sender: Sends = (
            Sender(
                self._session, settings, target.url, target.secret, allow_private_targets=private
            )
            if target.channel is None
            else ChannelSender(
                target.channel,
                self._session,
                settings,
                allow_private_targets=private,
                home=target.home,
            )
        )
        self.workers = [
            SourceWorker(
                target,
                source,
                nc,
                store,
                sender,
                self._counter,
                settings,
                rng,
                homes,
                partition_first=partition_first,
            )
            for source in sources(target)
        ]

    def redrive(self) -> None:
        for worker in self.workers:
            worker.redrive.set()

    async def run(self, stop: asyncio.Event) -> None:
        try:
            async with asyncio.TaskGroup() as tasks:
                for worker in self.workers:
                    tasks.create_task(worker.run(stop))
                tasks.create_task(self._counter.run(stop))
        finally:
            await self._counter.flush()
            await self._session.close()


class Dispatcher:
    def __init__(
        self,
        nc: NATS,
        store: DeliveryStore,
        settings: webhooks.WebhookSettings,
        lease: Lease,
        homes: HomeIndex | None = None,
    ) -> None:
        self._nc = nc
        self._homes = homes
        self._store = store
        self._settings = settings
        self._lease = lease
        self._rng = random.Random()
        # Each subscription's delivery with its task and the event that asks it to stop.
        self._workers: dict[
            str, tuple[SubscriptionDelivery, asyncio.Task[None], asyncio.Event]
        ] = {}
        self._changed = asyncio.Event()
        # Readiness: set once it delivers (it holds the lease and has listed its
        # subscriptions), and while it stands by behind another process's lease.
        self.bound = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver while this process holds the lease; stand by while another one does."""
        watch = await self._nc.subscribe(subjects.SUBSCRIPTIONS_CHANGED_ALL, cb=self._on_change)
        try:
            while not stop.is_set():
                if not await self._lease.try_acquire():
                    self.bound.set()  # a standby is ready: it takes over when the lease frees
                    held = await self._lease.acquire(stop)
                    self.bound.clear()
                    if not held:
                        return
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(self._lease.keep(stop))
                    tasks.create_task(self._dispatch(stop))
                    tasks.create_task(self._check_notifications(stop))
        finally:
            await self._lease.release()
            with contextlib.suppress(Exception):
                await watch.unsubscribe()

    async def _on_change(self, msg: Msg) -> None:
        with contextlib.suppress(ValueError):
            entry = self._workers.get(subjects.parse_subscription_changed(msg.subject))
            if entry:
                entry[0].redrive()
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
                        self.bound.set()
                        next_reload = loop.time() + RELOAD_EVERY_S
                    except Exception as exc:  # the database is down: try again shortly
                        log.warning("subscriptions reload failed: %s", exc)
                        next_reload = loop.time() + 1.0
                # Woken by a notice; otherwise look at stop and the lease every second.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 1.0)
        finally:
            self.bound.clear()
            await self._stop_workers(list(self._workers))

    async def _reload(self, redrive: bool) -> None:
        """Start a worker per new subscription, stop those of deleted or changed ones."""
        targets = await self._store.targets()
        first = await bus.partition_first(self._nc.jetstream())  # the filters' layout
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
                    self._workers[sid][0].redrive()
                continue
            worker = SubscriptionDelivery(
                target, self._nc, self._store, self._settings, self._rng, self._homes, first
            )
            quit_ = asyncio.Event()
            task = asyncio.create_task(worker.run(quit_), name=f"webhook-{sid}")
            task.add_done_callback(_log_crash)
            self._workers[sid] = (worker, task, quit_)
            started += 1
        if gone or started:
            log.info("delivering %d subscription(s)", len(self._workers))

    async def _check_notifications(self, stop: asyncio.Event) -> None:
        """While the lease is held: notifications addressed to no subscription."""
        quit_ = asyncio.Event()
        check = NotificationCheck(self._nc, self._store, lambda: self._workers.keys())

        async def watch() -> None:
            while not stop.is_set() and self._lease.held.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
            quit_.set()

        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(watch())
            tasks.create_task(check.run(quit_))

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
