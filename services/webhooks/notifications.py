"""Notifications addressed to a webhook subscription that does not exist.

A rule's `notify` action may name a subscription: the rules service publishes the alert on
`system.notify.<subscription_id>`, and that subscription's own consumer delivers it (see
`worker.py`). When no such subscription exists no consumer would ever read it: this reads
every notification (the durable `webhooks-notify`) and dead-letters those with the reason
(`deadletter.system.notify.<id>`, inspectable and re-drivable like any dead letter).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from libs import bus, subjects, webhooks
from services.webhooks.store import DeliveryStore

log = logging.getLogger(__name__)

FETCH_BATCH = 100
ERROR_PAUSE_S = 2.0


class NotificationCheck:
    def __init__(
        self,
        js: JetStreamContext,
        store: DeliveryStore,
        delivering: Callable[[], Collection[str]],
    ) -> None:
        self._js = js
        self._store = store
        self._delivering = delivering  # the subscriptions this process delivers right now

    async def run(self, stop: asyncio.Event) -> None:
        sub: JetStreamContext.PullSubscription | None = None
        try:
            while not stop.is_set():
                try:
                    if sub is None:
                        sub = await self._js.pull_subscribe_bind(
                            bus.WEBHOOKS_NOTIFY_DURABLE, stream=subjects.SYSTEM_STREAM
                        )
                    try:
                        msgs = await sub.fetch(FETCH_BATCH, timeout=1.0)
                    except TimeoutError:
                        continue
                    for msg in msgs:
                        await self._check(msg)
                except Exception as exc:  # the database or the bus is down: un-acked, again
                    log.warning("notifications: %s", exc)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), ERROR_PAUSE_S)
        finally:
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def _check(self, msg: Msg) -> None:
        """Ack a notification whose subscription exists; dead-letter the others."""
        try:
            subscription_id = webhooks.parse_notification(msg.subject)
        except ValueError as exc:
            reason = str(exc)
        else:
            if subscription_id in self._delivering() or await self._store.exists(subscription_id):
                await msg.ack()
                return
            reason = f"webhook subscription {subscription_id!r} does not exist"
        await bus.dead_letter(self._js, msg, reason, bus.WEBHOOKS_NOTIFY_DURABLE)
        await msg.ack()
