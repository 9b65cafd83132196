"""Publishing CloudEvents to the bus, replaying stored messages, following them live.

Replay is a bounded read of the stream (`libs.replay`): at most `limit` messages, never
waiting for more than are stored.
Following shares one ordered push consumer per filter among every live subscriber of that
filter (`SharedFeeds`): each message is copied into each subscriber's bounded queue. A
subscriber that resumes from a sequence reads an ordered consumer of its own until it reaches
the shared one, then switches to it (sequences decide: nothing twice, nothing missed). A
subscriber that cannot keep up is cut off (it resumes from its last sequence) instead of
growing memory. A subscriber who sees only its homes' messages gets those `libs.homes` says are
about one of them; a message is classified once, before it is handed on: a fact that places
its object by the home it states, one about an object the index has not heard of yet after
waiting for its home (with the messages behind it). A replay classifies its page the same way.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import anyio
import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy, PubAck

from libs import bus, replay, subjects
from libs import messages as m
from libs.errors import Invalid, Unavailable
from libs.homes import LOOK_UP_TIMEOUT_S, Audience, HomeIndex, Unknown
from services.gateway.events.schemas import BusMessage, EventPage, Published
from services.gateway.health.storage import BusStorage
from services.gateway.pagination import decode_cursor, encode_cursor
from services.gateway.resources import Shutdown, require_bus

log = logging.getLogger(__name__)

FEED_CAPACITY = 1000
# A shared feed wakes its followers at most this often: what arrives meanwhile goes out in the
# same write. A message that finds the feed idle is handed on at once (after the others of
# the same read from the bus), so this bounds the delay it adds, under load only.
WAKE_INTERVAL_S = 0.005
PUBLISH_TIMEOUT_S = 10.0
# A replay for someone who sees only its homes' messages looks at this many at most per page.
MAX_SCAN = 10_000
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


class _Unclassified:
    """Not classified yet (None is a home's answer: the message is no home's)."""


_UNCLASSIFIED = _Unclassified()


class Delivered:
    """One message for the followers of a filter. The shared feed hands the same object to
    each of them, so its SSE frame and the tail of its WebSocket frame are encoded once (by
    the first follower that needs them) and every other one writes the ready bytes."""

    __slots__ = ("_home", "_sse", "_ws_tail", "data", "seq", "subject")

    def __init__(self, seq: int, subject: str, data: bytes) -> None:
        self.seq = seq
        self.subject = subject
        self.data = data
        self._sse: bytes | None = None
        self._ws_tail: bytes | None = None
        self._home: str | _Unclassified | None = _UNCLASSIFIED

    def __repr__(self) -> str:
        return f"Delivered(seq={self.seq!r}, subject={self.subject!r}, data={self.data!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Delivered):
            return NotImplemented
        return (self.seq, self.subject, self.data) == (other.seq, other.subject, other.data)

    __hash__ = None  # type: ignore[assignment]  # equal by value, so not hashable (as dataclass(eq=True))

    def home(self, index: HomeIndex) -> str | None:
        """The home the message is about, classified the first time only (one split and one
        lookup per message, whatever the number of followers who see only their homes)."""
        home = self._home
        if isinstance(home, _Unclassified):  # not `classified` before: no look-up now
            home = self._home = index.home_at_once(self.subject, self.data)
        return home

    def classified(self, index: HomeIndex) -> bool:
        """Classify it before it is handed on, with `home`'s one lookup; False when the
        index alone cannot tell: a fact that places its object, or an object the index has
        not heard of yet (`wait_for_home` then)."""
        if isinstance(self._home, _Unclassified):
            home = index.classify(self.subject)
            if isinstance(home, Unknown):
                return False
            self._home = home
        return True

    async def wait_for_home(self, index: HomeIndex, stored: datetime | None = None) -> None:
        """Classify a message the index alone cannot tell by the home it states (a fact that
        places its object: a move's goes to the new home, whatever the index holds yet) or
        the database's (`HomeIndex.home_of_message`), rather than pass it for no home's; a
        device's message from before it came to its home (dated by its body, else `stored`)
        is no home's."""
        self._home = await index.home_of_message(self.subject, self.data, stored=stored)

    def sse(self, encode: Callable[[Delivered], bytes]) -> bytes:
        """The message's SSE frame, made by `encode` the first time only."""
        frame = self._sse
        if frame is None:
            frame = self._sse = encode(self)
        return frame

    def ws_tail(self, encode: Callable[[Delivered], bytes]) -> bytes:
        """What follows the subscription id in its WebSocket frame, made once."""
        tail = self._ws_tail
        if tail is None:
            tail = self._ws_tail = encode(self)
        return tail


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
    """One subscriber's messages, in order, through a bounded queue: from the filter's shared
    consumer, or (catching up) from an ordered consumer of its own until it reaches that."""

    def __init__(
        self,
        capacity: int,
        on_overflow: Callable[[], None] | None = None,
        *,
        after_seq: int = 0,
        audience: Audience | None = None,
    ) -> None:
        # A deque and one waiter instead of an asyncio.Queue: a push is an append (and a wake
        # only when the subscriber waits), a take drains the lot without a task per wait.
        self._queue: collections.deque[Delivered] = collections.deque()
        self._capacity = capacity
        self._waiter: asyncio.Future[None] | None = None
        # `next` answers None once `timeout` passes without a message taken (a heartbeat is
        # due): one timer per such period, not one per wait (a writer waits after each write).
        self._quiet_since = asyncio.get_running_loop().time()
        self._alarm: asyncio.TimerHandle | None = None
        self._overflowed = False
        # Told at once, while a subscriber may still be stuck sending what it took before.
        self._on_overflow = on_overflow
        self._last_seq = after_seq
        # Who reads it, when that is someone who sees only its homes' messages.
        self._audience = audience
        self._stopped = False
        # The subscriber's own (catch-up) consumer, until it switches to the shared one.
        self._subscription: Subscription | None = None
        self._unsubscribing: asyncio.Task[None] | None = None
        self._undo: list[Callable[[], None]] = []
        # The shared feed this one is a follower of; `catching_up` while it reads its own.
        self._tail: _SharedTail | None = None
        self._feeds: SharedFeeds | None = None
        # `pending`: attached, takes nothing yet; `catching_up`: its own consumer is behind.
        self.pending = False
        self.catching_up = False

    @property
    def last_seq(self) -> int:
        return self._last_seq

    @property
    def audience(self) -> Audience | None:
        return self._audience

    async def on_message(self, msg: Msg) -> None:
        """The catch-up consumer's callback (or a private consumer's)."""
        if self._overflowed:
            return
        seq = stream_seq(msg)
        if seq <= self._last_seq:
            return
        delivered = Delivered(seq, subjects.published(msg.subject), msg.data)
        audience = self._audience
        if audience is not None:
            # Read back from the stream, so placed by its body and the time it was stored: a
            # device's message from before it came to its home is no home's (the shared
            # feed's, new ones, need not be dated). The consumer's next message waits behind
            # this one (the callback is awaited).
            await delivered.wait_for_home(audience.index, _stored_at(msg))
        self.push(delivered)
        tail = self._tail
        if self.catching_up and tail is not None and seq >= tail.position:
            # Caught up with the shared feed: it brings the next ones.
            self.switch_to_shared()

    def switch_to_shared(self) -> None:
        """Take the shared feed's messages from now on; the own consumer ends."""
        self.catching_up = False
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            self._unsubscribing = asyncio.ensure_future(_unsubscribe(subscription))

    def push(self, delivered: Delivered, *, wake: bool = True) -> None:
        """Queue `delivered` unless it is at or below the last one queued; `wake=False`:
        the caller wakes the subscriber later (`wake`)."""
        if self._overflowed or delivered.seq <= self._last_seq:
            # Sequences only grow on a feed, from where it starts: an ordered consumer that
            # was re-created (after a gap or a missed heartbeat) may start too early, and a
            # feed switching to the shared one may see a message from both.
            return
        audience = self._audience
        if audience is not None and not audience.sees_home(delivered.home(audience.index)):
            self._last_seq = delivered.seq  # passed over: not for this reader
            return
        if len(self._queue) >= self._capacity:
            # Keep what is queued (a contiguous run) and drop the rest: the subscriber
            # resumes after the last one it received.
            self._overflowed = True
            self._wake()
            if self._on_overflow is not None:
                self._on_overflow()
            return
        self._queue.append(delivered)
        self._last_seq = delivered.seq
        if wake:
            self._wake()

    def wake(self) -> None:
        """Wake the subscriber if it waits and something is queued."""
        if self._queue and self._waiter is not None:
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    @property
    def overflowed(self) -> bool:
        return self._overflowed

    def bind(self, subscription: Subscription | None, shutdown: Shutdown) -> None:
        self._subscription = subscription
        self._undo.append(shutdown.on_request(self.stop))
        if shutdown.requested:
            self.stop()

    def stop(self) -> None:
        """End the feed now (the gateway is stopping, or the client went away); wakes a
        waiting `next`."""
        self._stopped = True
        self._wake()

    def _ring(self) -> None:
        self._alarm = None
        self._wake()

    async def next(self, timeout: float) -> Delivered | None:
        """The next message, or None once `timeout` has passed since the last one taken (or
        since the last None) without another.

        Raises FeedOverflow once cut off (after what was queued), FeedClosed when stopped.
        """
        queue = self._queue
        loop = asyncio.get_running_loop()
        if not queue and not self._stopped and not self._overflowed:
            while not queue and not self._stopped and not self._overflowed:
                deadline = self._quiet_since + timeout
                now = loop.time()
                if now >= deadline:
                    self._quiet_since = now
                    return None
                # The alarm only wakes the wait, which looks at the time again: one armed
                # earlier (a shorter timeout before) is fine, one later is replaced.
                alarm = self._alarm
                if alarm is None or alarm.when() > deadline:
                    if alarm is not None:
                        alarm.cancel()
                    self._alarm = loop.call_at(deadline, self._ring)
                waiter = self._waiter = loop.create_future()
                try:
                    await waiter
                finally:
                    if self._waiter is waiter:
                        self._waiter = None
        if self._stopped:
            raise FeedClosed
        if not queue:
            raise FeedOverflow
        self._quiet_since = loop.time()
        return queue.popleft()

    async def take(self, timeout: float, limit: int) -> list[Delivered]:
        """The next message and those queued behind it (at most `limit`), in order; empty
        after `timeout` without one. Raises like `next`.

        A subscriber that fell behind catches up in a few large writes instead of many small
        ones, and queued messages never wait for a write of their own.
        """
        first = await self.next(timeout)
        if first is None:
            return []
        queue = self._queue
        if not queue:
            return [first]
        count = min(len(queue), limit - 1)
        batch = [first]
        batch.extend(queue.popleft() for _ in range(count))
        return batch

    async def close(self) -> None:
        """Leave the shared feed, unsubscribe; safe to call while the request is being
        cancelled, and more than once."""
        for undo in self._undo:
            undo()
        self._undo.clear()
        alarm, self._alarm = self._alarm, None
        if alarm is not None:
            alarm.cancel()
        subscription, self._subscription = self._subscription, None
        unsubscribing, self._unsubscribing = self._unsubscribing, None
        # The client went away: the stream task is cancelled, the unsubscribe must still run.
        with anyio.CancelScope(shield=True):
            if subscription is not None:
                await _unsubscribe(subscription)
            if unsubscribing is not None:
                await asyncio.wait([unsubscribing])
            feeds, self._feeds = self._feeds, None
            if feeds is not None:
                await feeds.detach(self)


async def _unsubscribe(subscription: Subscription) -> None:
    try:
        await subscription.unsubscribe()
    except nats.errors.Error as exc:  # the server drops the idle consumer anyway
        log.info("unsubscribe of a live feed failed: %s", exc)


class _SharedTail:
    """One ordered consumer of a filter, from the stream's last sequence on, whose messages
    go to every follower of that filter."""

    def __init__(self, subject: str) -> None:
        self.subject = subject
        self.followers: set[LiveFeed] = set()
        # While a follower sees only its homes' messages: the index that classifies each
        # message once, before it is handed on (`join`, `leave`).
        self.index: HomeIndex | None = None
        self._homed = 0
        self.subscription: JetStreamContext.PushSubscription | None = None
        # The last sequence the consumer has passed on (at first: the stream's last).
        self.position = 0
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._woken_at = -WAKE_INTERVAL_S
        self._waking: asyncio.Handle | None = None

    async def on_message(self, msg: Msg) -> None:
        seq = stream_seq(msg)
        previous = self.position
        if seq <= previous:
            return  # a re-created ordered consumer that starts too early: seen already
        self.position = seq
        delivered = Delivered(seq, subjects.published(msg.subject), msg.data)
        index = self.index
        if index is not None and not delivered.classified(index):
            # Awaited by the consumer: a message waiting for its home holds back the next
            # ones (order), and a follower joining meanwhile starts after it (`position`).
            await delivered.wait_for_home(index)
        for feed in list(self.followers):
            if feed.pending:
                continue
            if feed.catching_up:
                # Its own consumer is behind: that one brings this message later, unless the
                # feed has everything up to here (no message of the filter in between).
                if feed.last_seq < previous:
                    continue
                feed.switch_to_shared()
            feed.push(delivered, wake=False)
        if self._waking is None:
            loop = asyncio.get_running_loop()
            due = self._woken_at + WAKE_INTERVAL_S
            if loop.time() >= due:
                self._waking = loop.call_soon(self._wake_followers)
            else:
                self._waking = loop.call_at(due, self._wake_followers)

    def join(self, feed: LiveFeed) -> None:
        self.followers.add(feed)
        if feed.audience is not None:
            self._homed += 1
            self.index = feed.audience.index

    def leave(self, feed: LiveFeed) -> None:
        if feed not in self.followers:
            return
        self.followers.remove(feed)
        if feed.audience is not None:
            self._homed -= 1
            if not self._homed:
                self.index = None

    def _wake_followers(self) -> None:
        """One wake per follower for whatever arrived since the last one."""
        self._waking = None
        self._woken_at = asyncio.get_running_loop().time()
        for feed in self.followers:
            feed.wake()

    def stop_waking(self) -> None:
        waking, self._waking = self._waking, None
        if waking is not None:
            waking.cancel()


class SharedFeeds:
    """The live feeds of one gateway: one ordered consumer per filter subject while it has
    followers, started by the first and ended when the last one leaves.

    Owned by the app (`app.state`, made with the bus connection); `close` (on the stop
    request, or at the end) ends every consumer."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self._tails: dict[str, _SharedTail] = {}
        self._closed = False
        self._closing: asyncio.Task[None] | None = None
        self.consumers_started = 0  # for tests and the benchmark: one per filter and life

    def tail(self, subject: str) -> _SharedTail | None:
        return self._tails.get(subject)

    def __len__(self) -> int:
        return len(self._tails)

    async def attach(self, feed: LiveFeed, subject: str, stream: str) -> _SharedTail:
        """Make `feed` a follower of `subject` (starting its consumer if it is the first);
        the feed takes nothing from it until it leaves the `pending` state set here."""
        if self._closed:
            raise FeedClosed
        tail = self._tails.get(subject)
        starting = tail is None
        if tail is None:
            tail = self._tails[subject] = _SharedTail(subject)
        feed._tail = tail
        feed._feeds = self
        feed.pending = True  # takes nothing from the tail until `follow` says where it is
        tail.join(feed)
        try:
            if starting:
                # Shielded: another follower may be waiting for this one's start.
                await asyncio.shield(self._start(tail, stream))
            else:
                await asyncio.shield(tail.ready)
        except BaseException:
            feed._feeds = None
            await self.detach(feed)
            raise
        return tail

    async def _start(self, tail: _SharedTail, stream: str) -> None:
        try:
            last = (await self.js.stream_info(stream)).state.last_seq
            tail.position = last
            config = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=last + 1
            )
            subscription = await self.js.subscribe(
                await bus.stored_filter(self.js, tail.subject),
                stream=stream,
                cb=tail.on_message,
                ordered_consumer=True,
                config=config,
            )
            _resume_after(subscription, last)
        except BaseException as exc:
            if self._tails.get(tail.subject) is tail:
                del self._tails[tail.subject]
            tail.ready.set_exception(exc)
            tail.ready.exception()  # retrieved: the waiters raise it themselves
            raise
        self.consumers_started += 1
        tail.subscription = subscription
        tail.ready.set_result(None)
        if not tail.followers:  # all left while it started
            await self._stop(tail)

    async def detach(self, feed: LiveFeed) -> None:
        """`feed` leaves its filter; the last follower's leaving ends the consumer."""
        tail, feed._tail = feed._tail, None
        if tail is None:
            return
        tail.leave(feed)
        if not tail.followers and tail.ready.done():
            await self._stop(tail)

    async def _stop(self, tail: _SharedTail) -> None:
        if self._tails.get(tail.subject) is tail:
            del self._tails[tail.subject]
        tail.stop_waking()
        subscription, tail.subscription = tail.subscription, None
        if subscription is not None:
            with anyio.CancelScope(shield=True):
                await _unsubscribe(subscription)

    def close_soon(self) -> None:
        """`close` from a callback (the stop request)."""
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self.close())

    async def close(self) -> None:
        """End every shared consumer (the gateway is stopping); new followers are refused."""
        self._closed = True
        for tail in list(self._tails.values()):
            for feed in list(tail.followers):
                feed.stop()
            if tail.ready.done():
                await self._stop(tail)


class EventService:
    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        shutdown: Shutdown,
        feeds: SharedFeeds | None = None,
        storage: BusStorage | None = None,
    ) -> None:
        self._nc = nc
        self._js = js
        self._shutdown = shutdown
        # The app's shared feeds; a service made on its own (tests, tools) has its own.
        self._feeds = feeds if feeds is not None else SharedFeeds(js)
        self._storage = storage if storage is not None else BusStorage()

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
        if not all(ack.duplicate for ack in acks):  # a repeat is answered even when full
            self._storage.stored()
        return [
            Published(id=e.id, stream=ack.stream, seq=ack.seq, duplicate=bool(ack.duplicate))
            for e, ack in zip(events, acks, strict=True)
        ]

    async def _publish_pipelined(self, events: list[m.CloudEvent]) -> list[PubAck]:
        batch = [(e.nats_subject, m.encode(e), e.id) for e in events]
        try:
            # An ack that never comes must not hold the request forever.
            return await bus.publish_many(self._js, batch, timeout=PUBLISH_TIMEOUT_S)
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
        audience: Audience | None = None,
    ) -> EventPage:
        """Stored messages matching `subject`, in stream order, after `after_seq` or from
        `since`; a `cursor` (the previous page's) continues where that page ended.

        For an `audience` (someone who sees its homes' messages only) the others are passed
        over: a page then holds those of the next `MAX_SCAN` messages that it sees, perhaps
        fewer than `limit` (a fact that places its object, or one about an object the index
        has not heard of, takes a place in the read before `seen_by` tells whose it is), and
        `next_cursor` goes on after the last message looked at."""
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
        keep = None if audience is None else audience.may_see
        if after_seq is None and since is not None:
            # Stream times are nanoseconds; the `time` we show is rounded to microseconds,
            # possibly up: a client that passes an item's time back must get that item.
            since -= ROUNDING
        page = await replay.read(
            self._js,
            stream,
            subject,
            limit=limit,
            after_seq=after_seq,
            since=since,
            keep=keep,
            scan=MAX_SCAN,
        )
        stored = page.messages if audience is None else await seen_by(audience, page.messages)
        items = [
            BusMessage(seq=s.seq, subject=s.subject, time=s.time, event=body(s.data))
            for s in stored
        ]
        return EventPage(
            items=items, next_cursor=encode_cursor(page.last_seen) if page.more else None
        )

    async def follow(
        self,
        subject: str,
        after_seq: int | None,
        on_overflow: Callable[[], None] | None = None,
        audience: Audience | None = None,
    ) -> LiveFeed:
        """Follow from `after_seq + 1`, or new messages only; the caller closes the feed.

        New messages come from the filter's shared consumer. A feed from `after_seq` reads
        an ordered consumer of its own until it reaches the shared one's position, then
        switches to it. `on_overflow` is called (once, from the bus's callback) when the
        subscriber falls `FEED_CAPACITY` messages behind. An `audience` gets only the
        messages about its homes (`libs.homes`), whatever the filter."""
        stream = stream_for(subject)
        require_bus(self._nc)
        feed = LiveFeed(FEED_CAPACITY, on_overflow, after_seq=after_seq or 0, audience=audience)
        tail = await self._feeds.attach(feed, subject, stream)
        try:
            feed.pending = False
            if after_seq is None or after_seq >= tail.position:
                # New messages only (after the shared feed's position), or a resume from
                # beyond it: the shared feed is all it needs.
                feed._last_seq = tail.position if after_seq is None else after_seq
                feed.bind(None, self._shutdown)
            else:
                feed.catching_up = True
                config = ConsumerConfig(
                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after_seq + 1
                )
                subscription = await self._js.subscribe(
                    await bus.stored_filter(self._js, subject),
                    stream=stream,
                    cb=feed.on_message,
                    ordered_consumer=True,
                    config=config,
                )
                _resume_after(subscription, after_seq)
                if feed.catching_up:
                    feed.bind(subscription, self._shutdown)
                else:  # switched already (the shared feed reached it first)
                    feed.bind(None, self._shutdown)
                    await _unsubscribe(subscription)
        except BaseException:
            await feed.close()
            raise
        return feed


async def seen_by(audience: Audience, messages: list[replay.Stored]) -> list[replay.Stored]:
    """Those of a page read with `Audience.may_see` that the audience sees, classified as a
    live feed does: a fact that places its object by the home it states, an object the index
    has not heard of by the database's, all within one look-up's time for the page (what is
    not told by then is hidden, as on a live feed)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LOOK_UP_TIMEOUT_S
    return [
        s
        for s in messages
        if await audience.sees_message(
            s.subject, s.data, timeout=deadline - loop.time(), stored=s.time
        )
    ]


def _stored_at(msg: Msg) -> datetime | None:
    """When the stream stored a message read from it (None: not a JetStream delivery)."""
    try:
        return msg.metadata.timestamp
    except nats.errors.NotJSMessageError:
        return None


def _resume_after(subscription: JetStreamContext.PushSubscription, seq: int) -> None:
    """nats-py (2.16) re-creates an ordered consumer after the last stream sequence it has
    seen, counted from 0 rather than from the start it was given: one re-created before its
    first message (a missed heartbeat on a busy gateway, a reconnect) would start over at the
    beginning of the stream. Give it the feed's start (the feed drops repeats either way)."""
    jsi = getattr(getattr(subscription, "_sub", None), "_jsi", None)
    if jsi is not None and isinstance(getattr(jsi, "_sseq", None), int):
        jsi._sseq = max(jsi._sseq, seq)


def body(data: bytes) -> Any:
    """A message body as JSON; empty (a bare signal) is null, non-JSON is kept as text."""
    if not data:
        return None
    try:
        return msgspec.json.decode(data)
    except msgspec.DecodeError:
        return data.decode("utf-8", errors="replace")
