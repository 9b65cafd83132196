"""One source of one subscription (its filter, or the notifications addressed to it):
fetch a batch → render → send, in order → ack the delivered prefix.

Each source has its own durable consumer (AckPolicy.ALL) and one request in flight: events go
out in stream order, and a slow, failing or hanging endpoint holds back only its own
subscription. The success path touches no database: a first-attempt success is counted (the
counter is written about once a second) and acked with the rest of its batch. A failed
attempt is recorded in `deliveries` and retried by this worker after a back-off, holding back
the events behind it (kept in progress on the bus meanwhile); the record's `next_attempt_at`
carries the schedule over a restart.

After a stop or a crash the consumer may hold un-acked events, and would hand out newer ones
before them: the next worker makes the consumer again from its ack floor, so that every event
after the last acked one comes again, in order. An event delivered but not yet acked when the
worker died is sent again (at least once; receivers de-duplicate on `webhook-id`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig
from nats.js.errors import NotFoundError
from prometheus_client import Counter

from libs import messages as m
from libs import subjects, webhooks
from libs.homes import HomeIndex
from libs.pull import Gaps
from services.webhooks.attempts import Attempted, after_attempt
from services.webhooks.payload import BATCHED, Item, Payload, event_id, render, render_batch
from services.webhooks.sender import Outcome, Sender, failed
from services.webhooks.store import DeliveryStore, Event, Known, Target

log = logging.getLogger(__name__)

ATTEMPTS = Counter("smarthome_webhook_attempts_total", "Webhook delivery attempts", ["outcome"])
EVENTS = Counter("smarthome_webhook_events_total", "Events delivered by webhooks", ["source"])
FETCH_TIMEOUT_S = 1.0
# After an unexpected error (database or bus down): wait, then carry on.
ERROR_PAUSE_S = 2.0
# Delivered events are acked at least this often, and at the end of every fetched batch.
ACK_EVERY_S = 1.0


@dataclass(frozen=True)
class Source:
    """Where a worker reads: a stream, through a durable consumer, on one filter."""

    name: str  # webhooks.FROM_FILTER | webhooks.FROM_NOTIFY
    stream: str
    durable: str


def sources(target: Target) -> tuple[Source, Source]:
    return (
        Source(webhooks.FROM_FILTER, target.stream, webhooks.consumer_name(target.id)),
        Source(
            webhooks.FROM_NOTIFY,
            subjects.SYSTEM_STREAM,
            webhooks.notify_consumer_name(target.id),
        ),
    )


class DeliveredCounter:
    """A subscription's delivered events, written to its row about once a second."""

    def __init__(self, store: DeliveryStore, subscription_id: str) -> None:
        self._store = store
        self._id = subscription_id
        self._count = 0
        self._at: datetime | None = None

    def add(self, events: int) -> None:
        self._count += events
        self._at = m.now()

    async def run(self, stop: asyncio.Event, every_s: float = 1.0) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)
            await self.flush()

    async def flush(self) -> None:
        if not self._count or self._at is None:
            return
        count, at = self._count, self._at
        try:
            await self._store.count_delivered(self._id, count, at)
        except Exception as exc:  # the database is down: kept, written with the next flush
            log.warning("subscription %s: delivered counter not written: %s", self._id, exc)
            return
        self._count -= count


class SourceWorker:
    def __init__(
        self,
        target: Target,
        source: Source,
        js: JetStreamContext,
        store: DeliveryStore,
        sender: Sender,
        counter: DeliveredCounter,
        settings: webhooks.WebhookSettings,
        rng: random.Random,
        homes: HomeIndex | None = None,
    ) -> None:
        self.target = target
        self.source = source
        # What each message is about, for a subscription of one home (needed then only).
        self._homes = homes
        self._js = js
        self._store = store
        self._sender = sender
        self._counter = counter
        self._settings = settings
        self._rng = rng
        self._batched = target.mode == BATCHED
        self._batch_size = (
            (target.batch_size or webhooks.DEFAULT_BATCH_SIZE) if self._batched else 1
        )
        self._fetch = webhooks.fetch_size(target.batch_size if self._batched else None)
        # Set when a user re-drove failed deliveries; also on start, for those that waited.
        self.redrive = asyncio.Event()
        self.redrive.set()
        # Fetched and not settled yet, in stream order.
        self._held: list[Msg] = []
        # Records of events after the ack floor (read when bound, then kept up to date).
        self._known: dict[int, Known] = {}
        self._settled_seq = 0  # the stream sequence of the last event settled
        self._ack_due: Msg | None = None  # the last settled event, when not acked yet
        self._acked_at = 0.0
        self._kept_alive_at = 0.0
        self._backlog = 0  # messages waiting on the consumer, as the last one fetched said
        self._gaps = Gaps()

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
                    if not self._held:
                        try:
                            msgs = await self._fetch_next(sub)
                        except TimeoutError:  # nats-py raises asyncio.TimeoutError here
                            continue
                        if self._missed(msgs):
                            await self._unbind(sub)  # bound again, from the ack floor
                            sub = None
                            continue
                        await self._hold(msgs)
                    await self._deliver_held(stop)
                except Exception as exc:
                    log.warning("subscription %s (%s): %s", self.target.id, self.source.name, exc)
                    await self._unbind(sub)
                    sub = None
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), ERROR_PAUSE_S)
        finally:
            await self._unbind(sub)

    # --- the consumer ------------------------------------------------------------------------

    def _config(self, start_seq: int | None = None) -> ConsumerConfig:
        ack_wait = self._settings.ack_wait_s
        batch = self.target.batch_size
        if self.source.name == webhooks.FROM_NOTIFY:
            return webhooks.notify_consumer_config(
                self.target.id, ack_wait, batch, start_seq=start_seq
            )
        return webhooks.consumer_config(
            self.target.id, self.target.filter, ack_wait, batch, start_seq=start_seq
        )

    async def _bind(self) -> JetStreamContext.PullSubscription:
        """Bind to the source's consumer: made again when the bus lost it, or from its ack
        floor when a previous worker left events un-acked."""
        stream, durable = self.source.stream, self.source.durable
        try:
            info = await self._js.consumer_info(stream, durable)
        except NotFoundError:
            # The gateway creates it with the row: missing, it was lost (or just deleted).
            if not await self._store.exists(self.target.id):
                raise RuntimeError("the subscription was deleted") from None
            log.warning(
                "subscription %s: its consumer %s was missing; made again (events published "
                "in between were not kept)",
                self.target.id,
                durable,
            )
            info = await self._js.add_consumer(stream, self._config())
        if info.num_ack_pending:
            # Left un-acked by a worker that stopped or died: the consumer would hand out newer
            # events before those. Made again from its ack floor, it hands them out in order.
            start = info.ack_floor.stream_seq + 1
            await self._js.delete_consumer(stream, durable)
            info = await self._js.add_consumer(stream, self._config(start_seq=start))
            log.info(
                "subscription %s: %s resumes at stream sequence %d",
                self.target.id,
                durable,
                start,
            )
        floor = info.ack_floor.stream_seq
        self._gaps = Gaps()  # a consumer made again numbers its deliveries anew
        self._known = await self._store.open_records(self.target.id, self.source.name, floor)
        self._settled_seq = floor
        return await self._js.pull_subscribe_bind(durable, stream=stream)

    async def _unbind(self, sub: JetStreamContext.PullSubscription | None) -> None:
        """Ack what was settled (waiting for the bus: the next bind reads the ack floor) and
        let go of the rest, which the next bind hands out again."""
        with contextlib.suppress(Exception):
            await self._ack(sync=True)
        self._held = []
        self._ack_due = None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()  # a pull subscription left to drain() blocks it

    async def _fetch_next(self, sub: JetStreamContext.PullSubscription) -> list[Msg]:
        """What is waiting, up to the fetch size, without waiting for more: nats-py's fetch
        of N waits until it has N or its timeout passes once it had to wait for the first,
        which would hold back what came first. So: N only when N are known to be waiting (the
        last message's `num_pending`), else the next one as soon as it comes, then those
        that came with it."""
        if self._backlog:
            msgs = await sub.fetch(min(self._fetch, self._backlog), timeout=FETCH_TIMEOUT_S)
        else:
            msgs = await sub.fetch(1, timeout=FETCH_TIMEOUT_S)
            more = min(self._fetch - 1, msgs[-1].metadata.num_pending or 0) if msgs else 0
            if more:
                with contextlib.suppress(TimeoutError):
                    msgs += await sub.fetch(more, timeout=FETCH_TIMEOUT_S)
        self._backlog = (msgs[-1].metadata.num_pending or 0) if msgs else 0
        return msgs

    def _missed(self, msgs: list[Msg]) -> bool:
        """Events handed out on a connection that died before they came (see libs.pull): the
        ack of a newer one would ack them undelivered."""
        for msg in msgs:
            self._gaps.note(msg)
        if not self._gaps.take():
            return False
        log.info(
            "subscription %s: %s deliveries never received", self.target.id, self.source.durable
        )
        return True

    async def _hold(self, msgs: list[Msg]) -> None:
        self._kept_alive_at = time.monotonic()
        for msg in msgs:
            seq = msg.metadata.sequence.stream
            if seq <= self._settled_seq:  # settled already, handed out again (a late ack)
                await msg.ack()
            elif self._addressed_elsewhere(msg) or await self._outside_home(msg):
                if not self._held:  # nothing before it to deliver: settled as it is
                    self._ack_due, self._settled_seq = msg, seq
                # else: the ack of what is held after it covers it (AckPolicy.ALL)
            else:
                self._held.append(msg)

    def _addressed_elsewhere(self, msg: Msg) -> bool:
        """A rule's notification goes to the subscription it names, through that one's
        notify consumer: not to every subscription whose filter covers `system.>` (and not
        twice to the one it names)."""
        return self.source.name == webhooks.FROM_FILTER and subjects.matches(
            subjects.NOTIFICATIONS_ALL, msg.subject
        )

    async def _outside_home(self, msg: Msg) -> bool:
        """A subscription of a home gets the messages about that home only, whatever its
        filter. An object the index has not heard of yet (its fact on the way) is asked of
        the database first: a message of the home is not dropped for being early. A rule's
        notification addressed to it is its home's (the gateway checked the rule's home)."""
        home = self.target.home
        if home is None or self.source.name != webhooks.FROM_FILTER:
            return False
        if self._homes is None:
            return True  # nobody can tell whose it is: not this home's to see
        if not self._homes.knows(msg.subject):
            await self._homes.look_up(msg.subject)
        return self._homes.home(msg.subject) != home

    async def _keep_alive(self) -> None:
        """Keep what is held in progress, so that the bus does not hand it out again."""
        if time.monotonic() - self._kept_alive_at < self._settings.ack_wait_s / 3:
            return
        self._kept_alive_at = time.monotonic()
        for msg in self._held:
            await msg.in_progress()

    async def _ack(self, sync: bool = False) -> None:
        """Ack the last settled event, and with it (AckPolicy.ALL) every one before it."""
        msg, self._ack_due = self._ack_due, None
        self._acked_at = time.monotonic()
        if msg is not None:
            await (msg.ack_sync() if sync else msg.ack())

    # --- delivering ----------------------------------------------------------------------------

    async def _deliver_held(self, stop: asyncio.Event) -> None:
        while self._held and not stop.is_set():
            chunk, known = self._next_request()
            if known is not None and (known.status != webhooks.PENDING or known.redriven):
                # Settled before a restart, or re-driven by a user (sent by `_redrive`).
                self._settle(chunk)
                continue
            retry_at = known.next_attempt_at if known is not None else None
            if retry_at is not None and retry_at > m.now():
                await self._ack()  # what went before it is done: say so before waiting
                await self._wait_until(retry_at, stop)
                continue  # looked at again: a re-drive or a stop may have come meanwhile
            await self._keep_alive()
            items = [self._item(msg) for msg in chunk]
            payload = self._render(items)
            outcome = await self._sender.send(payload)
            if outcome.ok and known is None:
                ATTEMPTS.labels(webhooks.DELIVERED).inc()
                self._delivered(len(chunk))
                self._settle(chunk)
            else:
                attempted = self._decide(known, outcome, self._settings.retry)
                events = [Event(i.seq, event_id(i), i.subject) for i in items]
                recorded = await self._store.record(
                    self.target.id, self.source.name, events, payload.msg_id, attempted
                )
                self._known.update(recorded)
                self._log(events, payload, attempted)
                if attempted.status == webhooks.DELIVERED:
                    self._delivered(len(chunk))
                if attempted.status != webhooks.PENDING:  # delivered, or dead-lettered
                    self._settle(chunk)
            if time.monotonic() - self._acked_at >= ACK_EVERY_S:
                await self._ack()
        await self._ack()

    def _next_request(self) -> tuple[list[Msg], Known | None]:
        """The held events the next request carries, and the record of the first one. In
        batched mode: as many as the batch size allows, up to the next event with a record of
        its own; a batch being retried goes again as it went (the same `webhook-id`)."""
        first = self._held[0]
        known = self._known.get(first.metadata.sequence.stream)
        if not self._batched:
            return [first], known
        chunk = [first]
        for msg in self._held[1 : self._batch_size]:
            other = self._known.get(msg.metadata.sequence.stream)
            same = (
                other is None
                if known is None
                else other is not None
                and (other.webhook_id == known.webhook_id and other.status == known.status)
            )
            if not same:
                break
            chunk.append(msg)
        return chunk, known

    def _settle(self, chunk: Sequence[Msg]) -> None:
        del self._held[: len(chunk)]
        for msg in chunk:
            self._known.pop(msg.metadata.sequence.stream, None)
        self._ack_due = chunk[-1]
        self._settled_seq = chunk[-1].metadata.sequence.stream

    def _delivered(self, events: int) -> None:
        self._counter.add(events)
        EVENTS.labels(self.source.name).inc(events)

    async def _wait_until(self, when: datetime, stop: asyncio.Event) -> None:
        """Until `when` (the next attempt), keeping what is held in progress; a re-drive
        asked meanwhile is sent while waiting."""
        while not stop.is_set():
            remaining = (when - m.now()).total_seconds()
            if remaining <= 0:
                return
            await self._keep_alive()
            woken = asyncio.ensure_future(self.redrive.wait())
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait(
                [woken, stopped],
                timeout=min(remaining, self._settings.ack_wait_s / 3),
                return_when=asyncio.FIRST_COMPLETED,
            )
            woken.cancel()
            stopped.cancel()
            if self.redrive.is_set() and not stop.is_set():
                self.redrive.clear()
                await self._redrive(stop)

    def _item(self, msg: Msg) -> Item:
        return Item(
            self.source.stream, msg.metadata.sequence.stream, msg.subject, msg.data, msg.headers
        )

    def _render(self, items: Sequence[Item]) -> Payload:
        if self._batched:
            return render_batch(items)
        (item,) = items
        fallback = f"{item.stream}-{item.seq}"
        return render(self.target.mode, item.subject, item.data, item.nats_headers, fallback)

    # --- re-drives -----------------------------------------------------------------------------

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
                subject = raw.subject or redriven.event.subject
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
            outcome = await self._sender.send(payload)
            attempted = self._decide(chunk[0].known, outcome, None)
            sent = {item.seq for item in items}
            events = [r.event for r in chunk if r.event.seq in sent]
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
        ATTEMPTS.labels(attempted.status).inc()
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
