"""One subscription's delivery loop: fetch → render → send → decide → record → ack.

Each subscription has its own worker and its own durable consumer with one message in flight:
its events go out in stream order, and a slow, failing or hanging endpoint holds back only its
own subscription. A failure is retried by `nak(delay=back-off)`, so the retry schedule lives in
the consumer and survives a restart of this service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from prometheus_client import Counter

from libs import messages as m
from libs import webhooks
from services.webhooks.attempts import Attempted, after_attempt
from services.webhooks.payload import Payload, render
from services.webhooks.sender import Outcome, Sender
from services.webhooks.store import DeliveryStore, Known, Target

log = logging.getLogger(__name__)

ATTEMPTS = Counter("smarthome_webhook_attempts_total", "Webhook delivery attempts", ["outcome"])
FETCH_TIMEOUT_S = 1.0
# After an unexpected error (database or bus down): wait, then carry on.
ERROR_PAUSE_S = 2.0


class SubscriptionWorker:
    def __init__(
        self,
        target: Target,
        js: JetStreamContext,
        store: DeliveryStore,
        sender: Sender,
        settings: webhooks.WebhookSettings,
        rng: random.Random,
    ) -> None:
        self.target = target
        self._js = js
        self._store = store
        self._sender = sender
        self._settings = settings
        self._rng = rng
        # Set when a user re-drove failed deliveries; also on start, for those that waited.
        self.redrive = asyncio.Event()
        self.redrive.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until `stop` is set or the task is cancelled (the subscription went away)."""
        sub: JetStreamContext.PullSubscription | None = None
        try:
            while not stop.is_set():
                try:
                    if sub is None:
                        sub = await self._bind()
                    if self.redrive.is_set():
                        self.redrive.clear()
                        await self._redrive(stop)
                    try:
                        msgs = await sub.fetch(1, timeout=FETCH_TIMEOUT_S)
                    except TimeoutError:  # nats-py raises asyncio.TimeoutError here
                        continue
                    for msg in msgs:
                        await self._deliver(msg)
                except Exception as exc:
                    log.warning("subscription %s: %s", self.target.id, exc)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), ERROR_PAUSE_S)
        finally:
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()  # a pull subscription left to drain() blocks it

    async def _bind(self) -> JetStreamContext.PullSubscription:
        """Bind to the subscription's consumer; make it again if the bus lost it."""
        durable = webhooks.consumer_name(self.target.id)
        try:
            await self._js.consumer_info(self.target.stream, durable)
        except NotFoundError:
            # The gateway creates it with the row: missing, it was lost (or just deleted).
            if await self._store.exists(self.target.id):
                log.warning(
                    "subscription %s: its consumer was missing; made again (events "
                    "published in between were not kept)",
                    self.target.id,
                )
                config = webhooks.consumer_config(
                    self.target.id, self.target.filter, self._settings.ack_wait_s
                )
                await self._js.add_consumer(self.target.stream, config)
        return await self._js.pull_subscribe_bind(durable, stream=self.target.stream)

    async def _deliver(self, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        try:
            known = await self._store.known(self.target.id, seq)
            if known is not None and (known.status != webhooks.PENDING or known.redriven):
                # Settled before a restart, or re-driven by a user (sent by `_redrive`).
                await msg.ack()
                return
            await msg.in_progress()  # the POST gets the whole ack wait
            payload = render(
                self.target.mode, msg.subject, msg.data, msg.headers, f"{self.target.stream}-{seq}"
            )
            outcome = await self._sender.send(self.target.url, self.target.secret, payload)
            attempted = self._decide(known, outcome, self._settings.retry)
            await self._store.record(self.target.id, seq, payload.msg_id, msg.subject, attempted)
        except BaseException:
            # Stopping, or the database is unreachable: let the consumer hand it out again.
            with contextlib.suppress(Exception):
                await msg.nak(delay=ERROR_PAUSE_S)
            raise
        if attempted.status == webhooks.DELIVERED:
            await msg.ack()
        elif attempted.status == webhooks.PENDING:
            await msg.nak(delay=attempted.retry_in_s)
        else:
            await msg.term()  # the retry window is over: the delivery is a dead letter
        self._log(seq, payload, attempted)

    async def _redrive(self, stop: asyncio.Event) -> None:
        """Send once more what a user re-drove from the dead-letter list, from the stream."""
        for item in await self._store.redriven(self.target.id):
            if stop.is_set():
                return
            try:
                raw = await self._js.get_msg(self.target.stream, item.event_seq)
            except NotFoundError:
                gone = Outcome(False, error="the event is no longer in the stream")
                attempted = self._decide(item.known, gone, None)
                await self._store.record(
                    self.target.id, item.event_seq, item.event_id, item.subject, attempted
                )
                continue
            payload = render(
                self.target.mode,
                raw.subject or item.subject,
                raw.data or b"",
                raw.headers,
                f"{self.target.stream}-{item.event_seq}",
            )
            outcome = await self._sender.send(self.target.url, self.target.secret, payload)
            attempted = self._decide(item.known, outcome, None)
            await self._store.record(
                self.target.id, item.event_seq, item.event_id, item.subject, attempted
            )
            self._log(item.event_seq, payload, attempted)

    def _decide(
        self, known: Known | None, outcome: Outcome, policy: webhooks.RetryPolicy | None
    ) -> Attempted:
        return after_attempt(known.previous if known else None, outcome, m.now(), policy, self._rng)

    def _log(self, seq: int, payload: Payload, attempted: Attempted) -> None:
        ATTEMPTS.labels(attempted.status).inc()
        if attempted.status == webhooks.DELIVERED:
            log.info(
                "subscription %s: delivered seq=%s id=%s after %d attempt(s)",
                self.target.id,
                seq,
                payload.msg_id,
                attempted.attempts,
            )
        else:
            log.warning(
                "subscription %s: seq=%s attempt %d failed (%s); %s",
                self.target.id,
                seq,
                attempted.attempts,
                attempted.error,
                f"retry in {attempted.retry_in_s:.2f} s"
                if attempted.retry_in_s is not None
                else "dead-lettered",
            )
