"""Notifications addressed to a webhook subscription or notification channel that does not
exist.

A rule's `notify` action may name a subscription or a channel: the rules service publishes the
alert on `system.notify.<id>`, and that subscription's (or channel's) own consumer delivers it
(see `worker.py`). When neither exists no consumer would ever read it: this reads
every notification (the durable `webhooks-notify`) and dead-letters those with the reason
(`deadletter.system.notify.<id>`, inspectable and re-drivable like any dead letter).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Mapping

from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig

from libs import bus, subjects
from libs.consumer import Consumer, Dead, Delivery, Item, Retry, Verdict
from services.webhooks.store import DeliveryStore

log = logging.getLogger(__name__)

FETCH_BATCH = 100


def _config() -> ConsumerConfig:
    """The consumer as the gateway provisions it (`bus.CONSUMERS`)."""
    for stream, config in bus.CONSUMERS:
        if stream == subjects.SYSTEM_STREAM and config.durable_name == bus.WEBHOOKS_NOTIFY_DURABLE:
            return config
    raise LookupError(bus.WEBHOOKS_NOTIFY_DURABLE)


def decode(msg: Delivery) -> str:
    """The subscription or channel a notification is addressed to (ValueError:
    dead-lettered)."""
    return subjects.parse_notification(msg.subject)


class NotificationCheck:
    def __init__(
        self,
        nc: NATS,
        store: DeliveryStore,
        delivering: Callable[[], Collection[str]],
    ) -> None:
        self._store = store
        self._delivering = delivering  # the subscriptions this process delivers right now
        self.consumer: Consumer[str] = Consumer(
            nc, subjects.SYSTEM_STREAM, _config(), decode, self.handle, batch=FETCH_BATCH
        )

    async def run(self, stop: asyncio.Event) -> None:
        await self.consumer.run(stop)

    async def handle(self, items: list[Item[str]]) -> Mapping[int, Verdict]:
        """Settle a notification whose subscription or channel exists; dead-letter the
        others."""
        verdicts: dict[int, Verdict] = {}
        for item in items:
            subscription_id = item.value
            try:
                exists = subscription_id in self._delivering() or await self._store.exists(
                    subscription_id
                )
            except Exception as exc:  # the database is down: naked, again later
                raise Retry(f"notifications: {exc!r}") from exc
            if not exists:
                reason = f"subscription or channel {subscription_id!r} does not exist"
                verdicts[item.delivery.seq] = Dead(reason, "no-subscription")
        return verdicts
