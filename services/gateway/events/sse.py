"""Server-Sent Events: a live feed written to an HTTP response.

A follower's frames go out on the server's own `send` (kept in the scope by
`ServerSendMiddleware`, the outermost middleware) rather than through every middleware's
wrapper around it: at 100 followers and 1,000 events/s those wrappers ran on every write of
every follower. The response's start and its end still pass through the middleware, which is
all they look at (the correlation id header, the request's status and duration).

One task per response writes what its feed has queued, all of it in one write; another one
only waits for the client to leave (`http.disconnect`) and ends the feed then.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import msgspec
from litestar import Litestar, Request
from litestar.background_tasks import BackgroundTask, BackgroundTasks
from litestar.datastructures import Cookie
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.response import Stream
from litestar.response.base import ASGIResponse
from litestar.types import ASGIApp, HTTPResponseBodyEvent, Receive, Scope, Send, TypeEncodersMap

from services.gateway.events.service import (
    FEED_CAPACITY,
    Delivered,
    FeedClosed,
    FeedOverflow,
    LiveFeed,
)

MEDIA_TYPE = "text/event-stream"
HEARTBEAT_S = 15.0
# Queued messages written to a client at once: one write instead of one per message.
BATCH = 256

SUBSCRIBED = b": subscribed\r\n\r\n"
HEARTBEAT = b": heartbeat\r\n\r\n"

_SERVER_SEND = "server_send"


class ServerSendMiddleware(ASGIMiddleware):
    """Keeps the server's `send` in the scope, for the body of a live stream; outermost."""

    scopes = (ScopeType.HTTP,)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        scope.setdefault("state", {})[_SERVER_SEND] = send
        await next_app(scope, receive, send)


def sse_event(delivered: Delivered) -> bytes:
    """The message's SSE frame: encoded once per message, whatever the number of clients."""
    return delivered.sse(_encode_event)


def _encode_event(delivered: Delivered) -> bytes:
    """`id:` stream sequence, `event:` subject, `data:` the message (one line per line)."""
    data = delivered.data
    if not data.isascii():
        data = data.decode("utf-8", errors="replace").encode()
    if b"\n" in data or b"\r" in data:
        lines = b"".join(b"data: %s\r\n" % line for line in data.splitlines())
    else:
        lines = b"data: %s\r\n" % data
    return b"id: %d\r\nevent: %s\r\n%s\r\n" % (delivered.seq, delivered.subject.encode(), lines)


def sse_error(detail: str) -> bytes:
    return b"event: error\r\ndata: %s\r\n\r\n" % msgspec.json.encode({"detail": detail})


def frames(batch: list[Delivered]) -> bytes:
    """The frames of `batch`, in order, as one chunk."""
    if len(batch) == 1:
        return sse_event(batch[0])
    return b"".join([sse_event(delivered) for delivered in batch])


class ServerSentEvents(Stream):
    """The response that follows `feed`; `release` gives the client's stream slot back.

    Both end when the client leaves, the feed is cut off or the gateway stops, also when the
    body never started."""

    __slots__ = ("feed", "release")

    def __init__(self, feed: LiveFeed, release: Callable[[], None]) -> None:
        super().__init__((), media_type=MEDIA_TYPE, headers={"Cache-Control": "no-cache"})
        self.feed = feed
        self.release = release

    def to_asgi_response(
        self,
        app: Litestar | None,
        request: Request,
        *,
        background: BackgroundTask | BackgroundTasks | None = None,
        cookies: Iterable[Cookie] | None = None,
        encoded_headers: Iterable[tuple[bytes, bytes]] | None = None,
        headers: dict[str, str] | None = None,
        is_head_response: bool = False,
        media_type: Any = None,
        status_code: int | None = None,
        type_encoders: TypeEncodersMap | None = None,
    ) -> ASGIResponse:
        merged: Mapping[str, Any] = {**headers, **self.headers} if headers else self.headers
        return _LiveResponse(
            self.feed,
            self.release,
            cookies=self.cookies if cookies is None else itertools.chain(self.cookies, cookies),
            headers=dict(merged),
            media_type=MEDIA_TYPE,
            status_code=self.status_code or status_code,
        )


class _LiveResponse(ASGIResponse):
    _should_set_content_length = False

    def __init__(
        self,
        feed: LiveFeed,
        release: Callable[[], None],
        *,
        cookies: Iterable[Cookie],
        headers: dict[str, Any],
        media_type: str,
        status_code: int | None,
    ) -> None:
        super().__init__(
            cookies=cookies, headers=headers, media_type=media_type, status_code=status_code
        )
        self._feed = feed
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        feed = self._feed
        try:
            await self.start_response(send)
            watching = asyncio.ensure_future(_watch(receive, feed))
            try:
                await _write(feed, scope.get("state", {}).get(_SERVER_SEND, send))
            finally:
                watching.cancel()
            # The end through the middleware, which measures the request's duration up to it.
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self._release()
            await feed.close()


async def _watch(receive: Receive, feed: LiveFeed) -> None:
    """End the feed when the client leaves (the server's `send` does nothing after that)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    feed.stop()


async def _write(feed: LiveFeed, send: Send) -> None:
    await send(_chunk(SUBSCRIBED))  # the subscription is in place: what follows is live
    while True:
        try:
            batch = await feed.take(timeout=HEARTBEAT_S, limit=BATCH)
        except FeedOverflow:
            await send(
                _chunk(
                    sse_error(
                        f"the client fell {FEED_CAPACITY} messages behind and was disconnected; "
                        "reconnect with Last-Event-ID to resume"
                    )
                )
            )
            return
        except FeedClosed:
            return  # gone, or the gateway is stopping (the client resumes with Last-Event-ID)
        await send(_chunk(frames(batch) if batch else HEARTBEAT))


def _chunk(body: bytes) -> HTTPResponseBodyEvent:
    return {"type": "http.response.body", "body": body, "more_body": True}
