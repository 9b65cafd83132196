"""One source of one subscription (its filter, or the notifications addressed to it): a
handler on the consumer runtime (`libs.consumer`) that renders and sends its batch, in order.

Each source has its own durable consumer (AckPolicy.ALL) and one request in flight: events go
out in stream order, and a slow, failing or hanging endpoint holds back only its own
subscription. The success path touches no database: a first-attempt success is counted (the
counter is written about once a second) and settled with the rest of its batch. A failed
attempt is recorded in `deliveries` and retried by this handler after a back-off, holding back
the events behind it (the runtime keeps the batch in progress meanwhile); what went before it
is settled first (`Consumer.settle`), and the record's `next_attempt_at` carries the schedule
over a restart.

What a stopped or crashed worker left un-acked the runtime reads again by sequence when it
binds, before anything newer, so events go out in order. An event delivered but not yet
settled when the worker died is sent again (at least once; receivers de-duplicate on
`webhook-id`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig
from nats.js.errors import NotFoundError
from prometheus_client import Counter

from libs import consumer, subjects, tracing, webhooks
from libs import messages as m
from libs.consumer import Consumer, Delivery, Retry
from libs.errors import Unavailable
from libs.homes import HomeIndex
from services.webhooks.attempts import Attempted, after_attempt
from services.webhooks.counter import DeliveredCounter
from services.webhooks.payload import BATCHED, Item, Payload, event_id, render, render_batch
from services.webhooks.sender import Outcome, Sends, failed
from services.webhooks.store import DeliveryStore, Event, Known, Target

log = logging.getLogger(__name__)

DELIVERIES = Counter(
    "smarthome_webhook_deliveries_total",
    "Webhook requests by result: delivered, retried (failed, tried again later), failed (no "
    "more tries: a dead letter)",
    ["result"],
)
# A delivery record's status after an attempt, as the counter's result names it.
RESULTS = {webhooks.DELIVERED: "delivered", webhooks.PENDING: "retried", webhooks.FAILED: "failed"}
EVENTS = Counter("smarthome_webhook_events_total", "Events delivered by webhooks", ["source"])
# After an unexpected error in a re-drive (database or bus down): wait, then carry on.
ERROR_PAUSE_S = 2.0
# Delivered events are settled at least this often, and at the end of every batch.
ACK_EVERY_S = 1.0
# How long the runtime waits for a batch to start (then it looks at `stop`).
FETCH_WAIT_S = 1.0


@dataclass(frozen=True)
class Source:
    """Where a worker reads: a stream, through a durable consumer, on one filter."""

    name: str  # webhooks.FROM_FILTER | webhooks.FROM_NOTIFY
    stream: str
    durable: str


def sources(target: Target) -> tuple[Source, ...]:
    """A subscription's filter and its notifications; a notification channel's notifications."""
    notify = Source(
        webhooks.FROM_NOTIFY, subjects.SYSTEM_STREAM, subjects.webhook_notify_consumer(target.id)
    )
    if target.channel is not None:
        return (notify,)
    return (
        Source(webhooks.FROM_FILTER, target.stream, subjects.webhook_consumer(target.id)),
        notify,
    )


def traced(received: consumer.Item[Item]) -> Item:
    """The message, carrying in its headers the `traceparent` its delivery continues
    (tracing on: its consume span's; off: its own, unchanged)."""
    item, traceparent = received.value, received.traceparent
    if traceparent is None or (item.nats_headers or {}).get(tracing.TRACEPARENT) == traceparent:
        return item
    return replace(
        item, nats_headers={**(item.nats_headers or {}), tracing.TRACEPARENT: traceparent}
    )


class SourceWorker:
    def __init__(
        self,
        target: Target,
        source: Source,
        nc: NATS,
        store: DeliveryStore,
        sender: Sends,
        counter: DeliveredCounter,
        settings: webhooks.WebhookSettings,
        rng: random.Random,
        homes: HomeIndex | None = None,
        *,
        partition_first: bool = True,
    ) -> None:
        self.target = target
        self.source = source
        self._partition_first = partition_first  # EVENTS' layout: its filter as stored
        # What each message is about, for a subscription of one home (needed then only).
        self._homes = homes
        self._js = nc.jetstream()
        self._store = store
        self._sender = sender
        self._counter = counter
        self._settings = settings
        self._rng = rng
        self._batched = target.mode == BATCHED
        self._batch_size = (
            (target.batch_size or webhooks.DEFAULT_BATCH_SIZE) if self._batched else 1
        )
        # Set when a user re-drove failed deliveries; also on start, for those that waited.
        self.redrive = asyncio.Event()
        self.redrive.set()
        # One request in flight per source: the handler's and the re-drives'.
        self._sending = asyncio.Lock()
        # Records of events not settled yet (read with the first batch, then kept up to date).
        self._known: dict[int, Known] | None = None
        self._stop = asyncio.Event()
        self.consumer: Consumer[Item] = Consumer(
            nc,
            source.stream,
            self._config(),
            self._decode,
            self._handle,
            batch=webhooks.fetch_size(target.batch_size if self._batched else None),
            wait=FETCH_WAIT_S,
            create=self._may_create,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until `stop` is set or the task is cancelled (the subscription went away)."""
        self._stop = stop
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._redrives(stop))
            await self.consumer.run(stop)

    # --- the consumer ------------------------------------------------------------------------

    def _config(self) -> ConsumerConfig:
        ack_wait = self._settings.ack_wait_s
        batch = self.target.batch_size
        if self.source.name == webhooks.FROM_NOTIFY:
            return webhooks.notify_consumer_config(self.target.id, ack_wait, batch)
        return webhooks.consumer_config(
            self.target.id,
            self.target.filter,
            ack_wait,
            batch,
            partition_first=self._partition_first,
        )

    async def _may_create(self) -> bool:
        """The gateway creates the consumer with the row: missing, it was lost (made again)
        or the subscription was just deleted (the next reload stops this worker)."""
        if not await self._store.exists(self.target.id):
            return False
        log.warning(
            "subscription %s: its consumer %s was missing; made again (events published "
            "in between were not kept)",
            self.target.id,
            self.source.durable,
        )
        return True

    def _decode(self, d: Delivery) -> Item | None:
        if self._addressed_elsewhere(d.subject):
            return None  # settled as it is
        return Item(d.stream, d.seq, d.subject, d.data, d.headers)

    def _addressed_elsewhere(self, subject: str) -> bool:
        """A rule's notification goes to the subscription it names, through that one's
        notify consumer: not to every subscription whose filter covers `system.>` (and not
        twice to the one it names)."""
        return self.source.name == webhooks.FROM_FILTER and subjects.matches(
            subjects.NOTIFICATIONS_ALL, subject
        )

    async def _outside_home(self, item: Item) -> bool:
        """A subscription of a home gets the messages about that home only, whatever its
        filter, told as the gateway's live feeds tell it (`HomeIndex.classify`): a fact that
        places its object by the home it states (a move's goes to the new home only). A
        rule's notification addressed to it is its home's (the gateway checked the rule's
        home)."""
        home = self.target.home
        if home is None or self.source.name != webhooks.FROM_FILTER:
            return False
        if self._homes is None:
            return True  # nobody can tell whose it is: not this home's to see
        # A database that does not answer is the handler's `Retry` (the message waits).
        return await self._homes.home_of(item.subject, item.data) != home

    # --- delivering ----------------------------------------------------------------------------

    async def _handle(self, batch: list[consumer.Item[Item]]) -> None:
        """Send the batch in order; a database or bus error is the runtime's `Retry` (the
        rest of the batch is handled again after a back-off)."""
        try:
            await self._deliver([traced(received) for received in batch])
        except (Retry, Unavailable):
            raise
        except Exception as exc:
            raise Retry(f"subscription {self.target.id} ({self.source.name}): {exc!r}") from exc

    async def _deliver(self, batch: list[Item]) -> None:
        if self._known is None:
            # The records of events from here on: retried or settled before a restart.
            self._known = await self._store.open_records(
                self.target.id, self.source.name, batch[0].seq - 1
            )
        held = [item for item in batch if not await self._outside_home(item)]
        settled_at = time.monotonic()
        done = 0  # how many of `held` are settled
        while done < len(held):
            chunk, known = self._next_request(held[done:])
            if known is not None and (known.status != webhooks.PENDING or known.redriven):
                # Settled before a restart, or re-driven by a user (sent by `_redrive`).
                done += self._forget(chunk)
                continue
            retry_at = known.next_attempt_at if known is not None else None
            if retry_at is not None and retry_at > m.now():
                # What went before it is done: settled before the wait, kept after a restart.
                await self.consumer.settle(chunk[0].seq - 1)
                settled_at = time.monotonic()
                await self._wait_until(retry_at)
                continue
            async with self._sending:
                if await self._attempt(chunk, known):
                    done += self._forget(chunk)
            if done and time.monotonic() - settled_at >= ACK_EVERY_S:
                await self.consumer.settle(held[done - 1].seq)
                settled_at = time.monotonic()

    async def _attempt(self, chunk: list[Item], known: Known | None) -> bool:
        """Send one request; whether its events are settled (delivered or dead-lettered)."""
        payload = self._render(chunk)
        # The request continues the trace of the (first) event it carries.
        traceparent = (chunk[0].nats_headers or {}).get(tracing.TRACEPARENT)
        with tracing.caused_by(traceparent, "webhooks deliver", subscription=str(self.target.id)):
            outcome = await self._sender.send(payload)
        if outcome.ok and known is None:
            DELIVERIES.labels("delivered").inc()
            self._delivered(len(chunk))
            return True
        attempted = self._decide(known, outcome, self._settings.retry)
        events = [Event(i.seq, event_id(i), i.subject) for i in chunk]
        recorded = await self._store.record(
            self.target.id, self.source.name, events, payload.msg_id, attempted
        )
        assert self._known is not None
        self._known.update(recorded)
        self._log(events, payload, attempted)
        if attempted.status == webhooks.DELIVERED:
            self._delivered(len(chunk))
        return attempted.status != webhooks.PENDING

    def _next_request(self, held: Sequence[Item]) -> tuple[list[Item], Known | None]:
        """The events the next request carries, and the record of the first one. In batched
        mode: as many as the batch size allows, up to the next event with a record of its
        own; a batch being retried goes again as it went (the same `webhook-id`)."""
        known_ = self._known or {}
        first = held[0]
        known = known_.get(first.seq)
        if not self._batched:
            return [first], known
        chunk = [first]
        for item in held[1 : self._batch_size]:
            other = known_.get(item.seq)
            same = (
                other is None
                if known is None
                else other is not None
                and (other.webhook_id == known.webhook_id and other.status == known.status)
            )
            if not same:
                break
            chunk.append(item)
        return chunk, known

    def _forget(self, chunk: Sequence[Item]) -> int:
        """The records of a settled chunk are no longer needed; how many it held."""
        if self._known is not None:
            for item in chunk:
                self._known.pop(item.seq, None)
        return len(chunk)

    def _delivered(self, events: int) -> None:
        self._counter.add(events)
        EVENTS.labels(self.source.name).inc(events)

    async def _wait_until(self, when: datetime) -> None:
        """Until `when` (the next attempt); a stop meanwhile leaves the rest un-acked."""
        remaining = (when - m.now()).total_seconds()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), max(remaining, 0.0))
        if self._stop.is_set():
            raise Retry("stopping")

    def _render(self, items: Sequence[Item]) -> Payload:
        if self._batched:
            return render_batch(items)
        (item,) = items
        fallback = f"{item.stream}-{item.seq}"
        return render(self.target.mode, item.subject, item.data, item.nats_headers, fallback)

    # --- re-drives -----------------------------------------------------------------------------

    async def _redrives(self, stop: asyncio.Event) -> None:
        """Send what users re-drove, whenever they do (and once on start)."""
        while not stop.is_set():
            woken = asyncio.ensure_future(self.redrive.wait())
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait([woken, stopped], return_when=asyncio.FIRST_COMPLETED)
            woken.cancel()
            stopped.cancel()
            if stop.is_set():
                return
            self.redrive.clear()
            try:
                await self._redrive(stop)
            except Exception as exc:  # the database or the bus is down: again shortly
                log.warning(
                    "subscription %s (%s): re-drive: %s", self.target.id, self.source.name, exc
                )
                self.redrive.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), ERROR_PAUSE_S)

    async def _redrive(self, stop: asyncio.Event) -> None:
        """Send once more what a user re-drove from the dead-letter list, from the stream (in
        batched mode, as many to a request as the batch size allows)."""
        waiting = await self._store.redriven(self.target.id, self.source.name)
        for start in range(0, len(waiting), self._batch_size):
            if stop.is_set():
                return
            chunk = waiting[start : start + self._batch_size]
            items: list[Item] = []
            for redriven in chunk:
                try:
                    raw = await self._js.get_msg(self.source.stream, redriven.event.seq)
                except NotFoundError:
                    gone = failed(webhooks.Failure.GONE, "the event is no longer in the stream")
                    attempted = self._decide(redriven.known, gone, None)
                    await self._store.record(
                        self.target.id,
                        self.source.name,
                        [redriven.event],
                        redriven.known.webhook_id,
                        attempted,
                    )
                    continue
                # As it was published: the EVENTS stream stores it with its partition.
                subject = subjects.published(raw.subject or redriven.event.subject)
                items.append(
                    Item(
                        self.source.stream,
                        redriven.event.seq,
                        subject,
                        raw.data or b"",
                        raw.headers,
                    )
                )
            if not items:
                continue
            payload = self._render(items)
            sent = {item.seq for item in items}
            events = [r.event for r in chunk if r.event.seq in sent]
            async with self._sending:
                outcome = await self._sender.send(payload)
                attempted = self._decide(chunk[0].known, outcome, None)
                await self._store.record(
                    self.target.id, self.source.name, events, payload.msg_id, attempted
                )
            if attempted.status == webhooks.DELIVERED:
                self._delivered(len(events))
            self._log(events, payload, attempted)

    # --- deciding and telling ------------------------------------------------------------------

    def _decide(
        self, known: Known | None, outcome: Outcome, policy: webhooks.RetryPolicy | None
    ) -> Attempted:
        return after_attempt(known.previous if known else None, outcome, m.now(), policy, self._rng)

    def _log(self, events: Sequence[Event], payload: Payload, attempted: Attempted) -> None:
        DELIVERIES.labels(RESULTS[attempted.status]).inc()
        what = (
            f"seq={events[0].seq}"
            if len(events) == 1
            else f"seq={events[0].seq}..{events[-1].seq} ({len(events)} events)"
        )
        if attempted.status == webhooks.DELIVERED:
            log.info(
                "subscription %s: delivered %s id=%s after %d attempt(s)",
                self.target.id,
                what,
                payload.msg_id,
                attempted.attempts,
            )
        else:
            log.warning(
                "subscription %s: %s attempt %d failed (%s); %s",
                self.target.id,
                what,
                attempted.attempts,
                attempted.error,
                f"retry in {attempted.retry_in_s:.2f} s"
                if attempted.retry_in_s is not None
                else "dead-lettered",
            )
