"""One WebSocket on `/events/ws`: several subscriptions, each its own live feed (no HTTP types).

Client → server (JSON text frames):

    {"type": "subscribe", "id": "s1", "subject": "events.>", "since_seq": 123}
    {"type": "unsubscribe", "id": "s1"}
    {"type": "ack", "id": "s1", "seq": 456}

Server → client: `subscribed`, `event` (`id`, `seq`, `subject`, `data`), `unsubscribed`,
`error` (`field` is a JSON path into the refused message, `id` its subscription) and a `ping`
every `HEARTBEAT_S`. A refused message leaves the socket open.

Each subscription is a live feed (`EventService.follow`, like SSE), from `since_seq + 1` or
from new messages on: the filter's shared consumer copies each message into it (a subscription
from `since_seq` reads a consumer of its own until it has caught up). The gateway keeps nothing
durable: an ack tells it how far the client got, and it sends at most `ACK_WINDOW` messages of
a subscription beyond the last ack. A client that goes past that window, or whose feed falls
`FEED_CAPACITY` messages behind because it does not read, is closed with 4008 and a reason that
names the sequence to resubscribe with. Its memory in the gateway is bounded by those two
numbers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgspec
import nats.errors

from libs.errors import PlatformError
from libs.homes import Audience
from services.gateway.events.schemas import (
    Ack,
    ClientMessage,
    ErrorFrame,
    EventFrame,
    Ping,
    ServerFrame,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
)
from services.gateway.events.service import (
    Delivered,
    EventService,
    FeedClosed,
    FeedOverflow,
    LiveFeed,
    body,
)
from services.gateway.problems import field_error

log = logging.getLogger(__name__)

HEARTBEAT_S = 15.0
MAX_SUBSCRIPTIONS = 20
ACK_WINDOW = 1000
MAX_CLIENT_FRAME = 4096
# How many queued messages one pass of a subscription takes before yielding to the others.
BATCH = 64
CLOSE_TOO_SLOW = 4008
CLOSE_STOPPING = 1012

client_message_decoder = msgspec.json.Decoder(ClientMessage)
raw_decoder = msgspec.json.Decoder(msgspec.Raw)
frame_encoder = msgspec.json.Encoder()


class _IdOnly(msgspec.Struct):
    """What a refused message may still tell: which subscription it was about."""

    id: str | None = None


id_decoder = msgspec.json.Decoder(_IdOnly)
PING = frame_encoder.encode(Ping())
# An event frame is `{"type":"event","id":` + the JSON subscription id + the shared tail.
_EMPTY_ID_HEAD = frame_encoder.encode(
    EventFrame(id="", seq=0, subject="", data=msgspec.Raw(b"null"))
).partition(b',"seq":')[0]
assert _EMPTY_ID_HEAD == b'{"type":"event","id":""'
EVENT_HEAD = _EMPTY_ID_HEAD[:-2]


class ClientGone(Exception):
    """The client went away while the gateway was sending to it."""


@dataclass(frozen=True)
class Close:
    code: int
    reason: str


Send = Callable[[bytes], Awaitable[None]]
# The next client frame, or None once the client has gone.
Receive = Callable[[], Awaitable[str | bytes | None]]


@dataclass
class _Subscription:
    id: str
    subject: str
    feed: LiveFeed
    # The client's position: its last ack, else its `since_seq`, else just before the first
    # message sent to it. None while nothing was sent on a subscription to new messages.
    position: int | None
    unacked: collections.deque[int] = field(default_factory=collections.deque)
    task: asyncio.Task[None] | None = None
    # `{"type":"event","id":<id>`: an event frame is this and the message's shared tail.
    frame_head: bytes = b""

    def __post_init__(self) -> None:
        self.frame_head = EVENT_HEAD + frame_encoder.encode(self.id)


class _Ended(Exception):
    """Raised in the task group's body once it is decided how the session ends."""


class EventSocket:
    """The subscriptions of one socket; `run` until the client leaves or must be closed."""

    def __init__(
        self,
        events: EventService,
        send: Send,
        *,
        max_subscriptions: int = MAX_SUBSCRIPTIONS,
        ack_window: int = ACK_WINDOW,
        heartbeat_s: float = HEARTBEAT_S,
        audience: Audience | None = None,
    ) -> None:
        self._events = events
        # Someone who sees its homes' messages only, whatever it subscribes to.
        self._audience = audience
        self._send_frame = send
        self._max_subscriptions = max_subscriptions
        self._ack_window = ack_window
        self._heartbeat_s = heartbeat_s
        self._subscriptions: dict[str, _Subscription] = {}
        self._ending: asyncio.Future[Close | None] = asyncio.get_running_loop().create_future()
        self._tasks: asyncio.TaskGroup | None = None

    async def run(self, receive: Receive) -> Close | None:
        """Serve the socket; returns how to close it, or None when the client has gone."""
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                tasks.create_task(self._read(receive))
                tasks.create_task(self._heartbeat())
                # Raising from the body cancels every task of the group (reader, heartbeat,
                # each subscription's sender, even one stuck in a send) and waits for them.
                raise _Ended(await self._ending)
        except* _Ended:
            pass
        finally:
            for subscription in list(self._subscriptions.values()):
                await subscription.feed.close()
            self._subscriptions.clear()
        return self._ending.result()

    def _end(self, close: Close | None) -> None:
        if not self._ending.done():
            self._ending.set_result(close)

    async def _send(self, frame: ServerFrame | bytes) -> None:
        data = frame if isinstance(frame, bytes) else frame_encoder.encode(frame)
        try:
            await self._send_frame(data)
        except ClientGone:
            self._end(None)
            # Nothing more can be sent: wait here to be cancelled with the other tasks.
            await asyncio.Future()

    # --- the client's messages --------------------------------------------------------------

    async def _read(self, receive: Receive) -> None:
        while (raw := await receive()) is not None:
            await self._handle(raw)
        self._end(None)

    async def _handle(self, raw: str | bytes) -> None:
        if len(raw) > MAX_CLIENT_FRAME:
            await self._refuse(None, f"a message may be at most {MAX_CLIENT_FRAME} bytes", "$")
            return
        try:
            message = client_message_decoder.decode(raw)
        except msgspec.DecodeError as exc:  # ValidationError included
            path, text = field_error(str(exc))
            await self._refuse(_id_of(raw), text, path)
            return
        match message:
            case Subscribe():
                await self._subscribe(message)
            case Unsubscribe():
                await self._unsubscribe(message)
            case Ack():
                await self._ack(message)

    async def _refuse(self, sub_id: str | None, message: str, path: str | None) -> None:
        await self._send(ErrorFrame(field=path, message=message, id=sub_id))

    async def _subscribe(self, request: Subscribe) -> None:
        if request.id in self._subscriptions:
            await self._refuse(request.id, "this id names a subscription of this socket", "$.id")
            return
        if len(self._subscriptions) >= self._max_subscriptions:
            await self._refuse(
                request.id,
                f"a socket may hold at most {self._max_subscriptions} subscriptions; "
                "unsubscribe one first",
                None,
            )
            return
        subscription: _Subscription | None = None

        def on_overflow() -> None:
            if subscription is not None:
                self._end(self._too_slow(subscription))

        try:
            feed = await self._events.follow(
                request.subject, request.since_seq, on_overflow, self._audience
            )
        except PlatformError as exc:
            await self._refuse(request.id, exc.detail, f"$.{exc.field}" if exc.field else None)
            return
        except nats.errors.Error as exc:
            log.warning("subscribe %s failed: %s", request.subject, exc)
            await self._refuse(request.id, "the event bus did not answer; try again later", None)
            return
        subscription = _Subscription(request.id, request.subject, feed, request.since_seq)
        self._subscriptions[request.id] = subscription
        if feed.overflowed:  # already, while this was being set up
            on_overflow()
        # `subscribed` goes out before the first event of the subscription.
        await self._send(Subscribed(id=request.id, subject=request.subject))
        assert self._tasks is not None
        subscription.task = self._tasks.create_task(self._forward(subscription))

    async def _unsubscribe(self, request: Unsubscribe) -> None:
        subscription = self._subscriptions.pop(request.id, None)
        if subscription is None:
            await self._refuse(request.id, "no subscription of this socket has this id", "$.id")
            return
        if subscription.task is not None:
            subscription.task.cancel()
            await asyncio.wait([subscription.task])  # without taking its cancellation as ours
        await subscription.feed.close()
        await self._send(Unsubscribed(id=request.id))

    async def _ack(self, request: Ack) -> None:
        subscription = self._subscriptions.get(request.id)
        if subscription is None:
            await self._refuse(request.id, "no subscription of this socket has this id", "$.id")
            return
        unacked = subscription.unacked
        last_sent = unacked[-1] if unacked else subscription.position
        if last_sent is None or request.seq > last_sent:
            await self._refuse(
                request.id,
                f"{request.seq} is beyond the last sequence sent on this subscription "
                f"({last_sent if last_sent is not None else 'none yet'})",
                "$.seq",
            )
            return
        while unacked and unacked[0] <= request.seq:
            unacked.popleft()
        if subscription.position is None or request.seq > subscription.position:
            subscription.position = request.seq

    # --- to the client ----------------------------------------------------------------------

    async def _forward(self, subscription: _Subscription) -> None:
        """Send the subscription's messages in order, within the ack window."""
        while True:
            try:
                batch = await subscription.feed.take(self._heartbeat_s, BATCH)
            except FeedOverflow:
                self._end(self._too_slow(subscription))
                return
            except FeedClosed:
                self._end(
                    Close(
                        CLOSE_STOPPING,
                        "the gateway is stopping; reconnect and resubscribe with since_seq",
                    )
                )
                return
            for delivered in batch:
                if len(subscription.unacked) >= self._ack_window:
                    self._end(self._too_slow(subscription))
                    return
                if subscription.position is None:
                    subscription.position = delivered.seq - 1
                subscription.unacked.append(delivered.seq)
                await self._send(subscription.frame_head + delivered.ws_tail(_event_tail))

    def _too_slow(self, subscription: _Subscription) -> Close:
        resume = (
            f"resubscribe with since_seq={subscription.position}"
            if subscription.position is not None
            else "resubscribe"
        )
        return Close(CLOSE_TOO_SLOW, f"client too slow; {resume}")

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_s)
            await self._send(PING)


def _event_frame(sub_id: str, delivered: Delivered) -> bytes:
    return EVENT_HEAD + frame_encoder.encode(sub_id) + delivered.ws_tail(_event_tail)


def _event_tail(delivered: Delivered) -> bytes:
    """An event frame from after its subscription id on: the same for every subscription,
    so encoded once per message (`EVENT_HEAD` and the id go before it)."""
    try:
        data = raw_decoder.decode(delivered.data)
    except msgspec.DecodeError:
        # Not JSON (a bare signal, text): the same value a replay shows for it.
        data = msgspec.Raw(frame_encoder.encode(body(delivered.data)))
    frame = frame_encoder.encode(
        EventFrame(id="", seq=delivered.seq, subject=delivered.subject, data=data)
    )
    assert frame.startswith(_EMPTY_ID_HEAD)
    return frame[len(_EMPTY_ID_HEAD) :]


def _id_of(raw: str | bytes) -> str | None:
    with contextlib.suppress(msgspec.DecodeError):
        sub_id = id_decoder.decode(raw).id
        return sub_id if isinstance(sub_id, str) and len(sub_id) <= 64 else None
    return None
