"""Publishing CloudEvents to the bus, replaying stored messages, following them live.

Replay uses an ephemeral pull consumer that exists for one request: it knows from its
`num_pending` how many messages match, fetches at most `limit` of them and is deleted.
Following uses an ordered push consumer per subscriber feeding a bounded queue: a subscriber
that cannot keep up is cut off (it resumes from its last sequence) instead of growing memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import anyio
import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, PubAck

from libs import bus, subjects
from libs import messages as m
from libs.errors import Invalid, Unavailable
from services.gateway.events.schemas import BusMessage, EventPage, Published
from services.gateway.pagination import decode_cursor, encode_cursor
from services.gateway.resources import Shutdown, require_bus

log = logging.getLogger(__name__)

# A replay consumer the gateway failed to delete (crash) is removed by the server after this.
REPLAY_IDLE_S = 30.0
REPLAY_FETCH_TIMEOUT_S = 5.0
FEED_CAPACITY = 1000
PUBLISH_TIMEOUT_S = 10.0
ROUNDING = timedelta(microseconds=1)


class FeedOverflow(Exception):
    """The subscriber fell `capacity` messages behind and was cut off."""


class FeedClosed(Exception):
    """The gateway is stopping: the subscriber resumes elsewhere from its last sequence."""


def stream_for(subject: str) -> str:
    """The stream holding a filter's subjects; 422 naming `subject` when there is none."""
    stream = subjects.stream_of(subject) if subjects.is_filter(subject) else None
    # `events` alone names no subject of the EVENTS stream (`events.>`): two tokens at least.
    if stream is None or "." not in subject:
        raise Invalid(
            f"{subject!r} is not a filter under events.>, commands.>, system.> or "
            "deadletter.> (tokens of A-Z a-z 0-9 _ -, `*` for one token, `>` for the rest)",
            field="subject",
        )
    return stream


@dataclass(frozen=True, slots=True)
class Delivered:
    seq: int
    subject: str
    data: bytes


def stream_seq(msg: Msg) -> int:
    """A delivered message's stream sequence, read straight from its reply subject
    (`$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>...`, or the form with domain and
    account hash): a live feed does this for every message and every subscriber."""
    tokens = msg.reply.split(".")
    if len(tokens) == 9:
        return int(tokens[5])
    if len(tokens) in (11, 12):
        return int(tokens[7])
    return msg.metadata.sequence.stream


class LiveFeed:
    """Messages of one ordered consumer, in order, through a bounded queue."""

    def __init__(
        self,
        capacity: int,
        on_overflow: Callable[[], None] | None = None,
        *,
        after_seq: int = 0,
    ) -> None:
        self._queue: asyncio.Queue[Delivered | None] = asyncio.Queue(capacity)
        self._overflowed = False
        # Told at once, while a subscriber may still be stuck sending what it took before.
        self._on_overflow = on_overflow
        self._last_seq = after_seq
        self._stopped = False
        self._subscription: Subscription | None = None
        self._undo: list[Callable[[], None]] = []

    async def on_message(self, msg: Msg) -> None:
        if self._overflowed:
            return
        seq = stream_seq(msg)
        if seq <= self._last_seq:
            # Sequences only grow on a feed, from where it starts: an ordered consumer that
            # was re-created (after a gap or a missed heartbeat) may start too early.
            return
        try:
            self._queue.put_nowait(Delivered(seq, msg.subject, msg.data))
            self._last_seq = seq
        except asyncio.QueueFull:
            # Keep what is queued (a contiguous run) and drop the rest: the subscriber
            # resumes after the last one it received.
            self._overflowed = True
            if self._on_overflow is not None:
                self._on_overflow()

    @property
    def overflowed(self) -> bool:
        return self._overflowed

    def bind(self, subscription: Subscription, shutdown: Shutdown) -> None:
        self._subscription = subscription
        self._undo.append(shutdown.on_request(self.stop))
        if shutdown.requested:
            self.stop()

    def stop(self) -> None:
        """End the feed now (the gateway is stopping); wakes a waiting `next`."""
        self._stopped = True
        with contextlib.suppress(asyncio.QueueFull):  # a full queue wakes `next` anyway
            self._queue.put_nowait(None)

    async def next(self, timeout: float) -> Delivered | None:
        """The next message, or None after `timeout` without one.

        Raises FeedOverflow once cut off (after what was queued), FeedClosed when stopped.
        """
        if self._stopped:
            raise FeedClosed
        if self._overflowed and self._queue.empty():
            raise FeedOverflow
        try:
            delivered = await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            if self._overflowed and self._queue.empty():
                raise FeedOverflow from None
            return None
        if delivered is None or self._stopped:
            raise FeedClosed
        return delivered

    async def take(self, timeout: float, limit: int) -> list[Delivered]:
        """The next message and those queued behind it (at most `limit`), in order; empty
        after `timeout` without one. Raises like `next`.

        A subscriber that fell behind catches up in a few large writes instead of many small
        ones, and queued messages never wait for a write of their own.
        """
        first = await self.next(timeout)
        if first is None:
            return []
        batch = [first]
        while len(batch) < limit:
            try:
                delivered = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if delivered is None:  # stopped: `next` says so on the following call
                break
            batch.append(delivered)
        return batch

    async def close(self) -> None:
        """Unsubscribe; safe to call while the request is being cancelled."""
        for undo in self._undo:
            undo()
        self._undo.clear()
        subscription, self._subscription = self._subscription, None
        if subscription is None:
            return
        # The client went away: the stream task is cancelled, the unsubscribe must still run.
        with anyio.CancelScope(shield=True):
            try:
                await subscription.unsubscribe()
            except nats.errors.Error as exc:  # the server drops the idle consumer anyway
                log.info("unsubscribe of a live feed failed: %s", exc)


class EventService:
    def __init__(self, nc: NATS, js: JetStreamContext, shutdown: Shutdown) -> None:
        self._nc = nc
        self._js = js
        self._shutdown = shutdown

    async def publish(self, events: list[m.CloudEvent], correlation_id: str) -> list[Published]:
        """Publish in order; the event id is the `Nats-Msg-Id`, so a repeat is stored once.

        A batch is pipelined (sent in order, acks awaited together). One that fails half-way
        can be sent again as a whole: what was stored already answers `duplicate` (within
        the stream's de-duplication window).
        """
        require_bus(self._nc)
        events = [
            e if e.correlationid else msgspec.structs.replace(e, correlationid=correlation_id)
            for e in events
        ]
        if len(events) == 1:
            [event] = events
            acks = [await bus.publish(self._js, event.nats_subject, event, msg_id=event.id)]
        else:
            acks = await self._publish_pipelined(events)
        return [
            Published(id=e.id, stream=ack.stream, seq=ack.seq, duplicate=bool(ack.duplicate))
            for e, ack in zip(events, acks, strict=True)
        ]

    async def _publish_pipelined(self, events: list[m.CloudEvent]) -> list[PubAck]:
        pending = [
            await self._js.publish_async(
                e.nats_subject, m.encode(e), headers=bus.headers(msg_id=e.id)
            )
            for e in events
        ]
        try:
            # publish_async has no deadline of its own: an ack that never comes must not
            # hold the request forever.
            return await asyncio.wait_for(asyncio.gather(*pending), PUBLISH_TIMEOUT_S)
        except TimeoutError:
            raise Unavailable(
                f"the event bus did not acknowledge the batch within {PUBLISH_TIMEOUT_S:g}s"
            ) from None

    async def replay(
        self,
        subject: str,
        *,
        after_seq: int | None,
        since: datetime | None,
        limit: int,
        cursor: str | None,
    ) -> EventPage:
        """Stored messages matching `subject`, in stream order, after `after_seq` or from
        `since`; a `cursor` (the previous page's) continues where that page ended."""
        stream = stream_for(subject)
        field = "since_seq"
        if cursor:
            after_seq, field = decode_cursor(cursor, int), "cursor"
        require_bus(self._nc)
        last_seq = (await self._js.stream_info(stream)).state.last_seq
        if after_seq is not None and after_seq > last_seq:
            raise Invalid(
                f"{after_seq} is beyond the last sequence of {stream} ({last_seq})",
                field=field,
            )
        if after_seq == last_seq:
            return EventPage(items=[], next_cursor=None)
        config = ConsumerConfig(
            name=f"replay-{m.new_id()}",
            filter_subject=subject,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=REPLAY_IDLE_S,
            mem_storage=True,
            num_replicas=1,
        )
        if after_seq is not None:
            config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = after_seq + 1
        elif since is not None:
            config.deliver_policy = DeliverPolicy.BY_START_TIME
            # Stream times are nanoseconds; the `time` we show is rounded to microseconds,
            # possibly up: a client that passes an item's time back must get that item.
            config.opt_start_time = since - ROUNDING
        else:
            config.deliver_policy = DeliverPolicy.ALL
        items, matching = await self._fetch(stream, config, limit)
        more = bool(items) and matching > len(items)
        return EventPage(items=items, next_cursor=encode_cursor(items[-1].seq) if more else None)

    async def _fetch(
        self, stream: str, config: ConsumerConfig, limit: int
    ) -> tuple[list[BusMessage], int]:
        """Up to `limit` messages, and how many matched when the consumer was made."""
        assert config.name is not None
        info = await self._js.add_consumer(stream, config)
        try:
            # num_pending: how many messages match from the start position; never wait for more.
            want = min(limit, info.num_pending)
            if want == 0:
                return [], 0
            subscription = await self._js.pull_subscribe_bind(consumer=config.name, stream=stream)
            items: list[BusMessage] = []
            try:
                while len(items) < want:
                    try:
                        msgs = await subscription.fetch(
                            want - len(items), timeout=REPLAY_FETCH_TIMEOUT_S
                        )
                    except nats.errors.TimeoutError:
                        break  # removed since counted (age or size limits): answer what we have
                    items.extend(_bus_message(msg) for msg in msgs)
            finally:
                await subscription.unsubscribe()
            return items, info.num_pending
        finally:
            with contextlib.suppress(nats.errors.Error):
                await self._js.delete_consumer(stream, config.name)

    async def follow(
        self,
        subject: str,
        after_seq: int | None,
        on_overflow: Callable[[], None] | None = None,
    ) -> LiveFeed:
        """Subscribe from `after_seq + 1`, or to new messages only; the caller closes the feed.

        `on_overflow` is called (once, from the bus's callback) when the subscriber falls
        `FEED_CAPACITY` messages behind."""
        stream = stream_for(subject)
        require_bus(self._nc)
        if after_seq is None:
            # New messages only, i.e. after the stream's last one: a position the feed knows.
            after_seq = (await self._js.stream_info(stream)).state.last_seq
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after_seq + 1
        )
        feed = LiveFeed(FEED_CAPACITY, on_overflow, after_seq=after_seq)
        subscription = await self._js.subscribe(
            subject, stream=stream, cb=feed.on_message, ordered_consumer=True, config=config
        )
        _resume_after(subscription, after_seq)
        feed.bind(subscription, self._shutdown)
        return feed


def _resume_after(subscription: JetStreamContext.PushSubscription, seq: int) -> None:
    """nats-py (2.16) re-creates an ordered consumer after the last stream sequence it has
    seen, counted from 0 rather than from the start it was given: one re-created before its
    first message (a missed heartbeat on a busy gateway, a reconnect) would start over at the
    beginning of the stream. Give it the feed's start (the feed drops repeats either way)."""
    jsi = getattr(getattr(subscription, "_sub", None), "_jsi", None)
    if jsi is not None and isinstance(getattr(jsi, "_sseq", None), int):
        jsi._sseq = max(jsi._sseq, seq)


def _bus_message(msg: Msg) -> BusMessage:
    meta = msg.metadata
    return BusMessage(
        seq=meta.sequence.stream, subject=msg.subject, time=meta.timestamp, event=body(msg.data)
    )


def body(data: bytes) -> Any:
    """A message body as JSON; empty (a bare signal) is null, non-JSON is kept as text."""
    if not data:
        return None
    try:
        return msgspec.json.decode(data)
    except msgspec.DecodeError:
        return data.decode("utf-8", errors="replace")
