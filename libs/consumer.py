"""The consumer runtime: one durable pull consumer's life, written once for every worker.

A worker supplies its consumer (stream, durable name, and the config to create it with when
it may), a decoder and a handler; this does the rest, top to bottom:

    bind → recover what was left un-acked → fetch → decode → handle → ack / nak / term

- **Fetch**: one strategy, `libs.pull.Puller` (one pull request open, messages handed out
  as they arrive), with the batch size and the wait as arguments, and a linger for a
  worker that would rather wait a little for a bigger batch.
- **Lost deliveries**: the bus numbers each delivery (its consumer sequence); a jump means
  deliveries handed out on a connection that died before they arrived. With AckPolicy.ALL
  the ack of a newer message would ack them unseen, so they are read from the stream by
  sequence (`js.get_msg`, public API) — every sequence after the last one settled, up to the
  batch, on the consumer's filter, that the batch does not hold — and handled first, in
  stream order, with the batch. Reading by sequence keeps the consumer (its config, its
  counters, its ack floor) as it is; re-creating it from its ack floor would need the right
  to delete consumers and would lose what it has delivered to no one yet. The same read
  runs once at bind time for what a previous reader left un-acked (ack floor → delivered).
  With AckPolicy.EXPLICIT nothing needs recovering: an un-acked message is redelivered
  after `ack_wait` whatever is acked after it.
- **Decode**: the decoder returns the value, None to skip a message (acked, not handled),
  or raises (`Undecodable`, msgspec's errors, ValueError): the message is dead-lettered on
  `deadletter.<subject>` with the reason (`bus.dead_letter`) and settled.
- **Handle**: the handler gets the decoded batch and returns verdicts by stream sequence for
  the messages that are not simply done (`Dead(reason)`, `Nak(delay)`); the runtime keeps
  the batch in progress on the bus while it runs. A dependency down is `Retry` (or
  `libs.errors.Unavailable`) raised by the handler: with AckPolicy.ALL the runtime keeps
  the batch and calls the handler again after a back-off (a nak would let the bus hand out
  newer messages, whose ack would ack the nak'ed ones); with EXPLICIT it naks the batch
  with the back-off as delay and the bus redelivers it.
- **Settle**: AckPolicy.ALL: one ack, of the batch's delivered message with the highest
  stream sequence; a redelivery of what was settled already is acked, not handled again.
  EXPLICIT: ack, nak(delay) or term each message. Dead letters are published first. A
  handler that works through its batch in order and may wait long in the middle (a webhook
  endpoint's retry back-off) calls `Consumer.settle(up_to_seq)` for the prefix it finished:
  settled at once, so a restart does not handle it again; a `Retry` afterwards handles the
  rest only.
- **Settle later** (AckPolicy.ALL): a handler whose batch is decided but not yet durable (a
  commit queued) returns a `Later` instead of its verdicts. The runtime hands out the next
  batch at once and settles the deferred ones strictly in order as their outcomes end (one
  ack for a run of them: the newest covers the older), keeping them in progress meanwhile.
  A batch that follows a deferred one is deferred behind it, whatever it returns. A failed
  outcome leaves it and every batch after it un-acked (their outcomes cancelled) and stops
  the consumer: what was decided after it rested on it; the next reader decides again.
  Redeliveries of what was handed over are neither handled again nor acked early; a stop
  waits a little (`SETTLE_GRACE_S`) for what is deferred.
- **Create**: `create=True` makes a missing consumer from the config; a callable decides
  each time it is found missing (e.g. only while what it serves still exists).
- **Stop**: the loop ends between batches (a batch being retried is left un-acked), the
  pull subscription goes, and the acks are flushed.
- **Metrics**: delivered, acked, redelivered, recovered, dead-lettered (by reason kind),
  handling seconds, and from consumer info every few seconds: pending and the ack floor.
- **Traces** (`libs.tracing`): tracing on, one span per message, the child of the trace its
  `traceparent` header names, ended when the message is settled (an error when it is
  dead-lettered, nak'ed, retried or left un-acked); each `Item.traceparent` makes what the
  worker publishes because of it a child of that span. Tracing off, `Item.traceparent` is
  the message's own header as it came, and nothing else is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import operator
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Generic, TypeVar

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, RawStreamMsg
from nats.js.errors import NotFoundError
from opentelemetry.trace import Span, StatusCode
from prometheus_client import Counter, Gauge, Histogram

from libs import bus, runtime, subjects, tracing
from libs.errors import Unavailable
from libs.loops import OnOneLoop
from libs.pull import Gaps, Puller, Reply

log = logging.getLogger(__name__)

T = TypeVar("T")
T_ = TypeVar("T_")
TRACEPARENT = tracing.TRACEPARENT

LABELS = ("stream", "consumer")
DELIVERED = Counter(
    "smarthome_consumer_delivered_total", "Messages the bus delivered to a consumer", LABELS
)
ACKED = Counter("smarthome_consumer_acked_total", "Messages settled by an ack", LABELS)
REDELIVERED = Counter(
    "smarthome_consumer_redelivered_total", "Messages delivered more than once", LABELS
)
RECOVERED = Counter(
    "smarthome_consumer_recovered_total",
    "Messages read from the stream by sequence: left un-acked, or lost with a connection",
    LABELS,
)
DEADLETTERS = Counter(
    "smarthome_deadletters_total", "Messages moved to deadletter.<subject>", ["stream", "reason"]
)
PENDING = Gauge(
    "smarthome_consumer_pending_messages",
    "Messages waiting on the consumer (consumer info)",
    LABELS,
)
ACK_PENDING = Gauge(
    "smarthome_consumer_ack_pending_messages",
    "Messages delivered and not yet acked (consumer info)",
    LABELS,
)
# Against the stream's newest sequence: how far back the consumer's backlog reaches, and so
# how near it is to what a stream at its byte budget drops (the gateway's stream gauges).
ACK_FLOOR = Gauge(
    "smarthome_consumer_ack_floor_stream_seq",
    "The stream sequence the consumer has acknowledged everything up to (consumer info)",
    LABELS,
)
HANDLE_SECONDS = Histogram(
    "smarthome_consumer_handle_seconds", "Time to handle one decoded batch", LABELS
)
# How old the data is when it is worked on (the lag in time, not in messages): the bus's
# share of a message's latency (stored → handed out) against the handler's (handle_seconds).
DELIVERY_AGE = Histogram(
    "smarthome_consumer_delivery_age_seconds",
    "Age of a batch's oldest message (since the stream stored it) when handed to the handler",
    LABELS,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)

PENDING_EVERY_S = 5.0
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 5.0
# A gap this long is first clamped to the stream's first sequence (limits, a purge).
CLAMP_ABOVE = 256
LINGER_TICK_S = 0.01
LINGER_BURST = 16  # messages that came in one wake: a backlog, not a trickle
# How long a stop waits for deferred batches to settle before leaving them to the next reader.
SETTLE_GRACE_S = 5.0


# --- what a worker supplies and gets ----------------------------------------------------------


class Undecodable(ValueError):
    """Raised by a decoder: the message can never be decoded (it is dead-lettered, with
    this exception's message as its reason)."""


class Retry(Exception):
    """Raised by a handler: a dependency is down; handle the batch again later."""


class Delivery(msgspec.Struct, frozen=True):
    """A message as a worker sees it: delivered by the consumer, or read from the stream by
    sequence (`msg` None: settled by the ack of a later delivery, AckPolicy.ALL). A Struct:
    made once per message, ten times cheaper to make than a frozen dataclass."""

    subject: str
    data: bytes
    headers: Mapping[str, str] | None
    stream: str
    seq: int  # stream sequence
    time: datetime
    delivered: int = 1  # how many times the bus delivered it (0: read from the stream)
    msg: Msg | None = None

    @classmethod
    def of(cls, msg: Msg, reply: Reply | None = None) -> Delivery:
        """`msg` as delivered, by its reply subject (`reply`: parsed already)."""
        r = reply or Reply.of(msg)
        return cls(
            subjects.published(msg.subject),
            msg.data,
            msg.headers,
            r.stream,
            r.stream_seq,
            # As nats-py's `Msg.metadata.timestamp` has it, to the microsecond.
            datetime.fromtimestamp(r.timestamp_ns / 1_000_000_000.0, UTC),
            r.delivered,
            msg,
        )

    @classmethod
    def read(cls, stream: str, raw: RawStreamMsg) -> Delivery:
        return cls(
            subjects.published(raw.subject or ""),
            raw.data or b"",
            raw.headers,
            stream,
            raw.seq or 0,
            raw.time or datetime.now(UTC),
            0,
            None,
        )


class Item(msgspec.Struct, Generic[T], frozen=True):
    """A decoded message for the handler. `traceparent`: the header to publish what follows
    from it with (the child of its consume span; tracing off, the message's own). A Struct:
    made once per message, and cheaper to make than a frozen dataclass."""

    delivery: Delivery
    value: T
    traceparent: str | None = None


@dataclass(frozen=True, slots=True)
class Dead:
    """Never to succeed: dead-lettered with `reason`; `kind` is the metric's label."""

    reason: str
    kind: str = "refused"


@dataclass(frozen=True, slots=True)
class Nak:
    """Not now: the bus redelivers it after `delay` seconds (AckPolicy.EXPLICIT only)."""

    delay: float | None = None


Verdict = Dead | Nak
Verdicts = Mapping[int, Verdict] | None


class Later:
    """A handler's answer for a batch decided but not yet durable (AckPolicy.ALL): settled
    when `outcome` ends, with its verdicts; see "Settle later" in the module docstring."""

    __slots__ = ("outcome",)

    def __init__(self, outcome: Awaitable[Verdicts]) -> None:
        self.outcome: asyncio.Future[Verdicts] = asyncio.ensure_future(outcome)


# Whether a consumer found missing may be created from its config (asked each time).
MayCreate = bool | Callable[[], Awaitable[bool]]
Decoder = Callable[[Delivery], T | None]
Handler = Callable[[list[Item[T]]], Awaitable[Verdicts | Later]]
DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, ValueError)
by_seq = operator.attrgetter("seq")


# --- pure decisions -----------------------------------------------------------------------------


def backoff(attempt: int, first: float = BACKOFF_FIRST_S, most: float = BACKOFF_MAX_S) -> float:
    """The wait before the `attempt`-th retry (0-based): doubling from `first` up to `most`."""
    return min(first * 2.0 ** min(attempt, 30), most)


def missing(after: int, batch_seqs: Sequence[int]) -> range | None:
    """The stream sequences to read for a batch that came after lost deliveries: after the
    last one settled, up to the batch's last (the batch's own are skipped while reading).
    None when the batch holds them all."""
    if not batch_seqs:
        return None
    wanted = range(after + 1, max(batch_seqs) + 1)
    return wanted if wanted and not set(wanted) <= set(batch_seqs) else None


def unacked(info: ConsumerInfo) -> range:
    """What a consumer handed out and nobody acked: after its ack floor, up to what it last
    delivered (stream sequences)."""
    floor = info.ack_floor.stream_seq if info.ack_floor else 0
    delivered = info.delivered.stream_seq if info.delivered else 0
    return range((floor or 0) + 1, (delivered or 0) + 1)


def retried(spans: Mapping[int, Span], exc: BaseException) -> None:
    """Mark the open messages' spans: their handling failed once (an error, even if a later
    attempt succeeds)."""
    reason = f"retried: {exc or type(exc).__name__}"
    for span in spans.values():
        span.add_event("retry", {"reason": reason})
        span.set_status(StatusCode.ERROR, reason)


def filters(config: ConsumerConfig) -> list[str]:
    return list(config.filter_subjects or [config.filter_subject or ">"])


@dataclass
class _Batch:
    """The batch a handler is working on: what is not settled yet, in stream order."""

    open: list[Delivery]
    verdicts: dict[int, Verdict]  # the decoder's (dead letters)
    stop: asyncio.Event
    through: int = 0  # the highest stream sequence `Consumer.settle` settled
    spans: dict[int, Span] | None = None  # tracing on: each open message's, by sequence


@dataclass(slots=True)
class _Deferred:
    """A batch handed over and not settled yet (AckPolicy.ALL)."""

    open: list[Delivery]
    verdicts: dict[int, Verdict]  # the decoder's
    outcome: asyncio.Future[Verdicts]
    spans: dict[int, Span] | None


def _done(loop: asyncio.AbstractEventLoop) -> asyncio.Future[Verdicts]:
    """An outcome that has ended: nothing to say."""
    done: asyncio.Future[Verdicts] = loop.create_future()
    done.set_result(None)
    return done


def end_spans(
    spans: dict[int, Span],
    deliveries: Sequence[Delivery],
    verdicts: Mapping[int, Verdict],
    unsettled: str | None = None,
) -> None:
    """End the spans of settled `deliveries` (or of ones left unsettled, saying why)."""
    for d in deliveries:
        span = spans.pop(d.seq, None)
        if span is None:
            continue
        verdict = verdicts.get(d.seq)
        if unsettled is not None:
            tracing.end(span, unsettled)
        elif isinstance(verdict, Dead):
            tracing.end(span, f"dead-lettered: {verdict.reason}")
        elif isinstance(verdict, Nak):
            tracing.end(span, "nak'ed: redelivered later")
        else:
            tracing.end(span)


@dataclass
class Plan:
    """What settling a batch takes, in this order: dead letters, then acks, naks, terms."""

    dead: list[tuple[Delivery, Dead]] = field(default_factory=list)
    ack: list[Msg] = field(default_factory=list)
    nak: list[tuple[Msg, float | None]] = field(default_factory=list)
    term: list[Msg] = field(default_factory=list)
    acked: int = 0  # messages the acks settle


def plan(ack_all: bool, deliveries: Sequence[Delivery], verdicts: Mapping[int, Verdict]) -> Plan:
    """How to settle `deliveries` by the worker's `verdicts` (by stream sequence; absent:
    done). AckPolicy.ALL: one ack, of the delivered message with the highest stream
    sequence, settles every message of the batch (a Nak cannot be honoured there: the ack
    would cover it). EXPLICIT: each delivered message on its own; a dead one is termed."""
    out = Plan()
    if verdicts:  # most batches have none: not a look-up per message
        for d in deliveries:
            verdict = verdicts.get(d.seq)
            if isinstance(verdict, Dead):
                out.dead.append((d, verdict))
    if ack_all:
        if any(isinstance(v, Nak) for v in verdicts.values()):
            raise ValueError("Nak needs AckPolicy.EXPLICIT: with ALL a later ack covers it")
        last = max((d for d in deliveries if d.msg is not None), key=by_seq, default=None)
        if last is not None:
            out.ack.append(last.msg)  # type: ignore[arg-type]  # msg is set: filtered above
            out.acked = len(deliveries)
        return out
    for d in deliveries:
        if d.msg is None:
            continue  # read from the stream: the bus redelivers it anyway
        verdict = verdicts.get(d.seq)
        if isinstance(verdict, Nak):
            out.nak.append((d.msg, verdict.delay))
        elif isinstance(verdict, Dead):
            out.term.append(d.msg)
        else:
            out.ack.append(d.msg)
            out.acked += 1
    return out


# --- the runtime --------------------------------------------------------------------------------


class _Pinger:
    """Runs `ping()` every `every` seconds until stopped: a timer, not the work in a task of
    its own (most batches end long before the first ping; a task per batch costs more).
    A class, not a closure that re-arms the timer with itself: that closure referred to
    itself, a reference cycle per batch that held the batch's messages until the garbage
    collector's next pass and made its passes frequent (20,000 objects a second in the
    actors at 1,000 events/s: a full collection every ~3 s, 30-80 ms each)."""

    __slots__ = ("_every", "_loop", "_ping", "_pings", "_timer")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, every: float, ping: Callable[[], Awaitable[None]]
    ) -> None:
        self._every = every
        self._ping = ping
        self._loop = loop
        self._pings: list[asyncio.Future[None]] = []
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(every, self._due)

    def _due(self) -> None:
        self._pings = [t for t in self._pings if not t.done()]
        self._pings.append(asyncio.ensure_future(self._ping()))
        self._timer = self._loop.call_later(self._every, self._due)

    async def stop(self) -> None:
        """No more pings; returns once those sent have ended (before the batch is settled,
        as they were sent)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pings:
            await asyncio.gather(*self._pings, return_exceptions=True)


class Consumer(OnOneLoop, Generic[T]):
    """Run `durable` on `stream` until `stop` is set: see the module docstring."""

    def __init__(
        self,
        nc: NATS,
        stream: str,
        config: ConsumerConfig,
        decode: Decoder[T],
        handle: Handler[T],
        *,
        batch: int = 100,
        wait: float = 1.0,
        linger: float = 0.0,
        create: MayCreate = False,
        pending_every: float = PENDING_EVERY_S,
    ) -> None:
        if not config.durable_name:
            raise ValueError("a durable consumer needs its durable_name")
        self._nc = nc
        self._js = nc.jetstream()
        self.stream = stream
        self.durable: str = config.durable_name
        self._config = config
        self._decode = decode
        self._handle = handle
        self._batch = batch
        self._wait = wait
        self._linger = linger
        self._create = create
        self._pending_every = pending_every
        self._ack_all = config.ack_policy != AckPolicy.EXPLICIT
        self._filters = filters(config)
        self._keep_alive_s = max((config.ack_wait or 30.0) / 3, 0.1)
        self._settled = 0  # AckPolicy.ALL: the highest stream sequence settled
        self._handed = 0  # ... handled: settled, or deferred (`Later`)
        self._deferred: deque[_Deferred] = deque()
        self._idle = asyncio.Event()  # set while nothing is deferred
        self._idle.set()
        self._queued = asyncio.Event()  # wakes the settler
        self._broken: BaseException | None = None  # a deferred batch failed: stop
        self.bound = asyncio.Event()  # set once the consumer is bound (for readiness)
        self._handling: _Batch | None = None  # while a handler runs
        labels = (stream, self.durable)
        self._delivered = DELIVERED.labels(*labels)
        self._acked = ACKED.labels(*labels)
        self._redelivered = REDELIVERED.labels(*labels)
        self._recovered = RECOVERED.labels(*labels)
        self._labels = labels
        self._seconds = HANDLE_SECONDS.labels(*labels)
        self._age = DELIVERY_AGE.labels(*labels)

    async def run(self, stop: asyncio.Event) -> None:
        info = await self._bind(stop)
        if info is None:
            return
        self._ack_all = info.config.ack_policy != AckPolicy.EXPLICIT
        self._filters = filters(info.config)
        self._keep_alive_s = max((info.config.ack_wait or 30.0) / 3, 0.1)
        self._settled = self._handed = info.ack_floor.stream_seq if info.ack_floor else 0
        puller = Puller(self._nc, self.stream, self.durable)
        # A delivery after the last one the consumer made, not the next: lost on the way.
        puller.gaps = Gaps(info.delivered.consumer_seq if info.delivered else 0)
        await puller.start()
        self.bound.set()
        ended = asyncio.Event()
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._watch_pending(stop, ended))
                settler = tasks.create_task(self._settle_deferred(stop))
                try:
                    if self._ack_all and not await self._recover(unacked(info), [], stop):
                        return
                    while not stop.is_set() and self._broken is None:
                        msgs = await self._fetch(puller)
                        if msgs:
                            await self._batch_arrived(msgs, puller.gaps.take(), stop)
                finally:
                    await self._finish_deferred(settler)
                    ended.set()
        finally:
            self.bound.clear()
            self._forget_gauges()
            await puller.stop()  # a pull subscription left to drain() blocks it
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=2)  # the last acks

    async def _fetch(self, puller: Puller) -> list[tuple[Msg, Reply]]:
        """What arrives within `wait`; with `linger`, also what arrives in the `linger`
        seconds after the first message, up to the batch: at a steady trickle, fewer and
        bigger batches for a worker whose every batch costs (a transaction, a commit)."""
        msgs = await puller.fetch(self._batch, self._wait)
        if not msgs or self._linger <= 0:
            return msgs
        loop = self._loop
        until = loop.time() + self._linger
        more = msgs
        while len(msgs) < self._batch and (left := until - loop.time()) > 0:
            if len(more) < LINGER_BURST:
                # A trickle: a wake per tick, not one per message (which costs more than
                # the message). A burst (a backlog) is taken as it comes, without a pause.
                await asyncio.sleep(min(left, LINGER_TICK_S))
            more = await puller.fetch(self._batch - len(msgs), max(until - loop.time(), 0.001))
            msgs += more
        return msgs

    # --- binding and recovering ---------------------------------------------------------------

    async def _bind(self, stop: asyncio.Event) -> ConsumerInfo | None:
        """The consumer's info: created from the config when missing and allowed, else
        waited for (the gateway provisions it); None if stopped first."""
        found: list[ConsumerInfo] = []
        told = False

        async def attempt() -> None:
            nonlocal told
            try:
                found.append(
                    await self._refiltered(await self._js.consumer_info(self.stream, self.durable))
                )
            except NotFoundError:
                may = self._create if isinstance(self._create, bool) else await self._create()
                if not may:
                    if not told:
                        log.info("waiting for %s/%s to be provisioned", self.stream, self.durable)
                        told = True
                    raise
                found.append(await self._js.add_consumer(self.stream, self._config))
                log.info("%s/%s was missing: created from its config", self.stream, self.durable)

        if not await runtime.retry_until_stopped(attempt, stop, f"binding {self.durable}"):
            return None
        return found[-1]

    async def _refiltered(self, info: ConsumerInfo) -> ConsumerInfo:
        """The consumer as found, its filter brought to the config's where they differ (an
        upgrade that changed how subjects are stored); it keeps its position."""
        if filters(info.config) == filters(self._config):
            return info
        config = dataclasses.replace(
            info.config,
            filter_subject=self._config.filter_subject,
            filter_subjects=self._config.filter_subjects,
        )
        log.info("%s/%s filters %s now", self.stream, self.durable, filters(self._config))
        return await self._js.add_consumer(self.stream, config)

    async def _read(
        self, seqs: range, skip: set[int], stop: asyncio.Event
    ) -> list[Delivery] | None:
        """The messages of `seqs` on the consumer's filter, read from the stream by sequence
        (those in `skip` and those gone with the stream's limits left out); None if stopped
        while the bus is down."""
        found: list[Delivery] = []

        async def read() -> None:
            found.clear()
            if self._filters == [">"]:
                await read_each()
                return
            # The next message on each filter, not every sequence: a filter may match few of
            # the stream's messages (a webhook subscription on one device of many).
            seen: set[int] = set()
            for f in self._filters:
                seq = seqs.start
                while seq < seqs.stop:
                    try:
                        raw = await self._js.get_msg(self.stream, seq, subject=f, next=True)
                    except NotFoundError:
                        break  # none on it from `seq` on
                    at = raw.seq or seqs.stop
                    if at >= seqs.stop:
                        break
                    if at not in skip and at not in seen:
                        seen.add(at)
                        found.append(Delivery.read(self.stream, raw))
                    seq = at + 1
            found.sort(key=lambda d: d.seq)

        async def read_each() -> None:
            start = seqs.start
            if len(seqs) > CLAMP_ABOVE:
                info = await self._js.stream_info(self.stream)
                start = max(start, info.state.first_seq)
            for seq in range(start, seqs.stop):
                if seq in skip:
                    continue
                try:
                    raw = await self._js.get_msg(self.stream, seq)
                except NotFoundError:
                    continue
                found.append(Delivery.read(self.stream, raw))

        if not await runtime.retry_until_stopped(
            read, stop, f"{self.durable}: reading by sequence"
        ):
            return None
        return found

    async def _recover(
        self, seqs: range | None, batch: list[Delivery], stop: asyncio.Event
    ) -> bool:
        """Handle what `seqs` holds that `batch` does not, with the batch; False if stopped."""
        stored: list[Delivery] = []
        if seqs:
            read = await self._read(seqs, {d.seq for d in batch}, stop)
            if read is None:
                return False
            stored = read
        if stored:
            self._recovered.inc(len(stored))
            log.info("%s: handling %d messages read from the stream", self.durable, len(stored))
        if not stored and not batch:
            return True
        whole = [*stored, *batch]
        whole.sort(key=by_seq)
        return await self._process(whole, stop)

    # --- a batch ------------------------------------------------------------------------------

    async def _batch_arrived(
        self, msgs: list[tuple[Msg, Reply]], missed: bool, stop: asyncio.Event
    ) -> None:
        self._delivered.inc(len(msgs))
        deliveries = [Delivery.of(msg, reply) for msg, reply in msgs]
        again = sum(d.delivered > 1 for d in deliveries)
        if again:
            self._redelivered.inc(again)
        if not self._ack_all:
            await self._process(deliveries, stop)
            return
        # Handled already (a late ack, or read from the stream before): not handled again.
        # The settled ones are acked (the ack of a fresh one covers them too: their sequences
        # are lower); the deferred ones are left to their batch's ack, not acked early.
        handed = self._handed
        fresh = [d for d in deliveries if d.seq > handed]
        if not fresh:
            settled = self._settled
            old = [d for d in deliveries if d.seq <= settled]
            if old:
                await self._apply(plan(True, old, {}), stop)
            return
        seqs = None
        if missed:
            log.info("%s: deliveries never received; reading them from the stream", self.durable)
            seqs = missing(handed, [d.seq for d in fresh])
        await self._recover(seqs, fresh, stop)

    async def _process(self, deliveries: list[Delivery], stop: asyncio.Event) -> bool:
        """Decode, handle (again while `Retry`), settle; False if stopped before settling."""
        verdicts: dict[int, Verdict] = {}
        items: list[Item[T]] = []
        spans = self._spans(deliveries) if tracing.enabled() else None
        decode = self._decode
        for d in deliveries:
            try:
                value = decode(d)
            except Undecodable as exc:  # the decoder's own words say what is wrong
                verdicts[d.seq] = Dead(str(exc), "undecodable")
                continue
            except DECODE_ERRORS as exc:
                verdicts[d.seq] = Dead(f"cannot be decoded: {exc}", "undecodable")
                continue
            if value is None:
                continue
            if spans is None:  # tracing off: the header passed on as it came
                items.append(Item(d, value, d.headers.get(TRACEPARENT) if d.headers else None))
            else:
                items.append(Item(d, value, tracing.traceparent_of(spans[d.seq])))
        batch = self._handling = _Batch(list(deliveries), dict(verdicts), stop, spans=spans)
        if items:  # in stream order: the first is the oldest
            self._age.observe(max(0.0, time.time() - items[0].delivery.time.timestamp()))
        settled = deferred = False
        later: Later | None = None
        try:
            attempt = 0
            while items:
                try:
                    with self._seconds.time():
                        said = await self._keeping_alive(self._handle(items), lambda: batch.open)
                    if isinstance(said, Later):
                        later = said
                    else:
                        verdicts.update(said or {})
                    break
                except (Retry, Unavailable) as exc:
                    # What the handler settled before it gave up is done: the rest only.
                    items = [i for i in items if i.delivery.seq > batch.through]
                    if spans:
                        retried(spans, exc)
                    if stop.is_set() and self._ack_all:
                        return False  # left un-acked: the next reader handles it
                    delay = backoff(attempt)
                    attempt += 1
                    log.warning(
                        "%s: %s; again in %.1f s", self.durable, exc or type(exc).__name__, delay
                    )
                    if not self._ack_all:
                        naks: dict[int, Verdict] = {d.seq: Nak(delay) for d in batch.open}
                        verdicts = naks | verdicts
                        settled = await self._apply(plan(False, batch.open, verdicts), stop)
                        return settled
                    if not await self._pause(delay, batch, stop):
                        return False  # left un-acked: the next reader handles it
            # Behind what is deferred (or settling, or failed): its ack would cover that.
            if later is not None or not self._idle.is_set() or self._broken is not None:
                deferred = settled = self._defer(batch, verdicts, later)
                return settled
            if not await self._apply(plan(self._ack_all, batch.open, verdicts), stop):
                return False
            settled = True
            if self._ack_all and batch.open:
                self._settled = max(self._settled, max(map(by_seq, batch.open)))
                self._handed = max(self._handed, self._settled)
            return True
        finally:
            self._handling = None
            if spans and not deferred:  # a deferred batch's end when it is settled
                why = None if settled else "not settled: left to the next reader"
                end_spans(spans, batch.open, verdicts, why)

    # --- deferred batches (`Later`) -----------------------------------------------------------

    def _defer(self, batch: _Batch, verdicts: dict[int, Verdict], later: Later | None) -> bool:
        """Queue `batch` to be settled after those deferred before it (when `later` ends:
        None, at once); False if refused: a deferred batch failed, and this one followed it."""
        if not self._ack_all:
            raise ValueError("Later needs AckPolicy.ALL: with EXPLICIT each message settles alone")
        outcome = later.outcome if later is not None else _done(self._loop)
        if self._broken is not None or not batch.open:
            outcome.cancel()
            return self._broken is None
        self._deferred.append(_Deferred(batch.open, verdicts, outcome, batch.spans))
        self._handed = max(self._handed, max(map(by_seq, batch.open)))
        self._idle.clear()
        self._queued.set()
        return True

    async def _settle_deferred(self, stop: asyncio.Event) -> None:
        """Settle deferred batches as their outcomes end, strictly in order: one ack for the
        run of them that has ended (the newest covers the older), dead letters first."""
        while True:
            if not self._deferred:
                self._idle.set()
                self._queued.clear()
                await self._queued.wait()
                continue
            try:
                await self._keeping_alive(
                    asyncio.shield(self._deferred[0].outcome), self._deferred_open
                )
                ended = [self._deferred.popleft()]
                while self._deferred and self._deferred[0].outcome.done():
                    ended.append(self._deferred.popleft())
                said = [d.verdicts | dict(d.outcome.result() or {}) for d in ended]
            except (Exception, asyncio.CancelledError) as exc:
                task = asyncio.current_task()
                if isinstance(exc, asyncio.CancelledError) and task and task.cancelling():
                    raise  # the settler is stopped, not the outcome
                log.warning(
                    "%s: a deferred batch failed (%r): it and those after it are left to the "
                    "next reader",
                    self.durable,
                    exc,
                )
                self._broken = exc
                self._abandon_deferred(f"not settled: {exc!r}")
                return
            await self._settle_ended(ended, said, stop)

    async def _settle_ended(
        self, ended: list[_Deferred], said: list[dict[int, Verdict]], stop: asyncio.Event
    ) -> None:
        deliveries = [d for batch in ended for d in batch.open]
        verdicts = {seq: v for each in said for seq, v in each.items()}
        if not await self._apply(plan(True, deliveries, verdicts), stop):
            self._broken = RuntimeError("stopped while dead-lettering")
            self._abandon_deferred("not settled: left to the next reader")
            return
        self._settled = max(self._settled, max(map(by_seq, deliveries)))
        for batch, verdict in zip(ended, said, strict=True):
            if batch.spans:
                end_spans(batch.spans, batch.open, verdict)

    def _deferred_open(self) -> list[Delivery]:
        return [d for batch in self._deferred for d in batch.open]

    def _abandon_deferred(self, why: str) -> None:
        """Leave every deferred batch un-acked (its outcome cancelled): the next reader
        handles it again."""
        while self._deferred:
            batch = self._deferred.popleft()
            batch.outcome.cancel()
            if batch.spans:
                end_spans(batch.spans, batch.open, {}, why)
        self._handed = self._settled
        self._idle.set()

    async def _finish_deferred(self, settler: asyncio.Task[None]) -> None:
        """At a stop: give what is deferred a moment to settle, then leave the rest."""
        if self._deferred and self._broken is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SETTLE_GRACE_S):
                    await self._idle.wait()
        settler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await settler
        self._abandon_deferred("not settled: the consumer stopped first")

    def _spans(self, deliveries: Sequence[Delivery]) -> dict[int, Span]:
        """Tracing on: a span for each message, the child of the trace it carries."""
        return {
            d.seq: tracing.start_consumed(
                f"{self.stream} process",
                d.headers,
                {
                    "messaging.system": "nats",
                    "messaging.operation.type": "process",
                    "messaging.destination.name": d.subject,
                    "messaging.consumer.group.name": self.durable,
                    "messaging.nats.stream.sequence": d.seq,
                    "messaging.message.delivery_count": d.delivered,
                },
            )
            for d in deliveries
        }

    async def settle(self, up_to_seq: int, verdicts: Mapping[int, Verdict] | None = None) -> bool:
        """For the handler while it runs: settle its batch's messages up to stream sequence
        `up_to_seq` now (done, or by `verdicts` as if returned) rather than when it returns,
        so that a restart does not handle them again. False if stopped while a dead letter
        could not be published (then nothing was settled)."""
        batch = self._handling
        if batch is None:
            raise RuntimeError("Consumer.settle() is for the handler, while it runs")
        await self._idle.wait()  # an ack now would cover what is deferred before the batch
        if self._broken is not None:
            return False
        prefix = [d for d in batch.open if d.seq <= up_to_seq]
        if not prefix:
            return True
        said = batch.verdicts | dict(verdicts or {})
        todo = plan(self._ack_all, prefix, said)
        if not await self._apply(todo, batch.stop):
            return False
        if batch.spans:
            end_spans(batch.spans, prefix, said)
        batch.open = [d for d in batch.open if d.seq > up_to_seq]
        batch.through = max(batch.through, up_to_seq)
        if self._ack_all:
            self._settled = max(self._settled, max(map(by_seq, prefix)))
        return True

    async def _keeping_alive(
        self, work: Awaitable[T_], open_now: Callable[[], Sequence[Delivery]]
    ) -> T_:
        """Await `work`, telling the bus the messages `open_now` gives are in progress every
        third of ack_wait (`_Pinger`)."""
        pinger = _Pinger(self._loop, self._keep_alive_s, lambda: self._in_progress(open_now()))
        try:
            return await work
        finally:
            await pinger.stop()

    async def _pause(self, delay: float, batch: _Batch, stop: asyncio.Event) -> bool:
        """Wait `delay` keeping the batch in progress; False if `stop` was set meanwhile."""
        loop = self._loop
        until = loop.time() + delay
        while (left := until - loop.time()) > 0:
            await self._in_progress(batch.open)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(left, self._keep_alive_s))
            if stop.is_set():
                return False
        return True

    async def _in_progress(self, deliveries: Sequence[Delivery]) -> None:
        for d in deliveries:
            if d.msg is not None:
                with contextlib.suppress(Exception):  # the bus is away: redelivered, at worst
                    await d.msg.in_progress()

    async def _apply(self, todo: Plan, stop: asyncio.Event) -> bool:
        """Settle as planned; False if stopped while a dead letter could not be published
        (nothing acked then: the next reader dead-letters it, its id de-duplicates)."""
        for d, dead in todo.dead:
            if not await self._dead_letter(d, dead, stop):
                return False
        # An ack lost with the connection only means a redelivery, settled again then.
        with contextlib.suppress(Exception):
            for msg in todo.ack:
                await msg.ack()
            for msg, delay in todo.nak:
                await msg.nak(delay=delay)
            for msg in todo.term:
                await msg.term()
        if todo.acked:
            self._acked.inc(todo.acked)
        return True

    async def _dead_letter(self, d: Delivery, dead: Dead, stop: asyncio.Event) -> bool:
        async def send() -> None:
            if d.msg is not None:
                await bus.dead_letter(self._js, d.msg, dead.reason, self.durable)
            else:
                await bus.dead_letter_stored(
                    self._js, d.subject, d.data, (d.stream, d.seq), dead.reason, self.durable
                )

        if not await runtime.retry_until_stopped(send, stop, f"{self.durable}: dead-lettering"):
            return False
        DEADLETTERS.labels(self.stream, dead.kind).inc()
        return True

    # --- the pending gauge --------------------------------------------------------------------

    def _forget_gauges(self) -> None:
        """The consumer info gauges go with the run: a partition taken over by another
        process is reported by that one only (a stale series would read as a backlog)."""
        for gauge in (PENDING, ACK_PENDING, ACK_FLOOR):
            with contextlib.suppress(KeyError):
                gauge.remove(*self._labels)

    async def _watch_pending(self, stop: asyncio.Event, ended: asyncio.Event) -> None:
        labels = self._labels
        while not stop.is_set() and not ended.is_set():
            with contextlib.suppress(Exception):  # the bus is away: the gauge waits
                info = await self._js.consumer_info(self.stream, self.durable)
                if ended.is_set():
                    return  # its gauges are gone with the run: not made again
                PENDING.labels(*labels).set(info.num_pending or 0)
                ACK_PENDING.labels(*labels).set(info.num_ack_pending or 0)
                ACK_FLOOR.labels(*labels).set(info.ack_floor.stream_seq if info.ack_floor else 0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ended.wait(), self._pending_every)
