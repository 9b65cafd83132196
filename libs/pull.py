"""Pulling a durable consumer's messages as soon as they are stored.

nats-py's `fetch(n)` sends a pull request when it is called and ends it when it returns: at
a steady 1,000 events/s, with batches of one or two events, each batch pays a request (a
round trip before the bus may deliver) and a closing status message, and nats-py awaits
each message with a timeout of its own. `Puller` keeps one pull request open (for the
room the consumer's `max_ack_pending` leaves) and hands out whatever has arrived, at once;
the next request is sent when the open one has ended.

It also notices deliveries that never arrived. The bus numbers each delivery of a consumer
(its consumer sequence, redeliveries included); within one reader a jump means messages
handed out on a connection that died before they came in. They stay un-acked until their ack
wait ends, and with AckPolicy.ALL the ack of a newer message would ack them unseen, so the
reader must read them from the stream first (`libs.consumer` does) when `Gaps.take()` says so.

Each message's numbers come from its reply subject, parsed once here (`Reply.of`): nats-py's
`Msg.metadata` builds three frozen dataclasses and a datetime per message, a tenth of a
draining worker's CPU, for the few numbers the runtime needs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
from typing import NamedTuple

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NotJSMessageError
from nats.js.api import DEFAULT_PREFIX, Header

from libs.loops import OnOneLoop

# A pull request lives this long on the server; the next is sent when it has ended (all
# its messages delivered, expired, or refused), so a request lost with a connection is
# replaced within this time.
REQUEST_EXPIRES_S = 1.0
# After a refusal (no JetStream, no such consumer, a limit): not a request per round trip.
REFUSED_BACKOFF_S = 0.1
HEARTBEAT = "100"
ENDED = ("404", "408")  # nothing more for this request; it expired
ACK_PREFIX = "$JS.ACK."


class Reply(NamedTuple):
    """What a JetStream delivery's reply subject says of it. A tuple: made per message."""

    stream: str
    stream_seq: int
    consumer_seq: int
    delivered: int  # how many times the bus delivered it
    timestamp_ns: int  # when it was stored (Unix nanoseconds)
    pending: int  # messages left for the consumer after it

    @classmethod
    def of(cls, msg: Msg) -> Reply:
        """Parsed from `msg.reply`: `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.
        <consumer seq>.<ns>.<pending>`, or the form with `<domain>.<account hash>.` before
        the stream (and more tokens after the pending count), as nats-py reads them."""
        reply = msg.reply
        if reply.startswith(ACK_PREFIX):
            tokens = reply.split(".")
            count = len(tokens)
            # The stream's token (0: neither form); the newer puts `<domain>.<account hash>`
            # before it.
            at = 2 if count == 9 else 4 if count >= 11 else 0
            if at:
                return cls(
                    tokens[at],
                    int(tokens[at + 3]),
                    int(tokens[at + 4]),
                    int(tokens[at + 2]),
                    int(tokens[at + 5]),
                    int(tokens[at + 6]),
                )
        raise NotJSMessageError


class Puller(OnOneLoop):
    """One open pull request at a time on `stream`/`durable`, for at most `room` messages
    (the room the consumer's `max_ack_pending` leaves), handed out as they come."""

    def __init__(self, nc: NATS, stream: str, durable: str) -> None:
        self._nc = nc
        self._subject = f"{DEFAULT_PREFIX}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._inbox = nc.new_inbox()
        self._sub: Subscription | None = None
        self._arrived: collections.deque[tuple[Msg, Reply]] = collections.deque()
        # Set while `fetch` waits: what wakes it (a future and a timer, not `wait_for` on an
        # Event, which costs a task per wait: a wait per batch at a trickle).
        self._waiter: asyncio.Future[None] | None = None
        self._open = 0  # messages the open request may still deliver
        self._open_until = 0.0  # loop time at which it has certainly ended
        self._next_request_at = 0.0
        self.gaps = Gaps()

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _on_msg(self, msg: Msg) -> None:
        status = (msg.headers or {}).get(Header.STATUS)
        if status is None:
            self._open -= 1
            reply = Reply.of(msg)
            self.gaps.note(reply.consumer_seq)
            self._arrived.append((msg, reply))
        elif status != HEARTBEAT:
            self._open = 0  # the request has ended
            if status not in ENDED:
                self._next_request_at = self._loop.time() + REFUSED_BACKOFF_S
        self._wake()

    async def fetch(self, room: int, timeout: float) -> list[tuple[Msg, Reply]]:
        """What has arrived, each message with its reply parsed; waits at most `timeout`
        for the first message ([] if none)."""
        loop = self._loop
        deadline = loop.time() + timeout
        while not self._arrived:
            now = loop.time()
            if now >= deadline:
                return []
            wait_until = deadline
            if (self._open <= 0 or now >= self._open_until) and room > 0:
                if now >= self._next_request_at:
                    await self._request(room, now)
                else:
                    wait_until = min(deadline, self._next_request_at)
            if not self._arrived:  # (some may have come while the request was sent)
                await self._wait(loop, wait_until - now)
        msgs = list(self._arrived)
        self._arrived.clear()
        return msgs

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        """Until a message or status arrives, or `timeout` has passed."""
        self._waiter = loop.create_future()
        timer = loop.call_later(timeout, self._wake)
        try:
            await self._waiter
        finally:
            timer.cancel()
            self._waiter = None

    async def _request(self, batch: int, now: float) -> None:
        self._open = batch
        self._open_until = now + REQUEST_EXPIRES_S + 0.5
        body = {"batch": batch, "expires": int(REQUEST_EXPIRES_S * 1e9)}
        await self._nc.publish(self._subject, json.dumps(body).encode(), reply=self._inbox)


class Gaps:
    """Deliveries handed out to one reader that never arrived (see the module docstring)."""

    def __init__(self, last: int = 0) -> None:
        # The consumer sequence of the last delivery received (or made, when bound).
        self._last = last
        self._missed = False

    def note(self, delivery: int) -> None:
        """A delivery received: its consumer sequence."""
        last = self._last
        if delivery > last:  # (per message: no call to max())
            if last and delivery > last + 1:
                self._missed = True
            self._last = delivery

    def take(self) -> bool:
        """Whether some went missing since the last call."""
        missed, self._missed = self._missed, False
        return missed
