"""`/api/v1/events`: publish, replay and follow (Server-Sent Events, WebSocket)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated

from litestar import Controller, Request, WebSocket, get, post, websocket
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.exceptions import WebSocketDisconnect
from litestar.params import HeaderParameter, JSONBody, QueryParameter
from litestar.status_codes import (
    HTTP_202_ACCEPTED,
    WS_1011_INTERNAL_ERROR,
    WS_1013_TRY_AGAIN_LATER,
)

from libs.errors import Invalid
from libs.principals import Permission, Principal
from services.gateway import scope
from services.gateway.auth.guards import requires
from services.gateway.body import StrictBody
from services.gateway.connections import (
    StreamLimits,
    TooManyStreams,
    provide_stream_limits,
    stream_owner,
)
from services.gateway.correlation import provide_correlation_id
from services.gateway.events.schemas import (
    MAX_BATCH,
    EventPage,
    PublishBody,
    Published,
    PublishedBatch,
)
from services.gateway.events.service import FEED_CAPACITY, MAX_SCAN, EventService, SharedFeeds
from services.gateway.events.sse import HEARTBEAT_S, ServerSentEvents
from services.gateway.events.websocket import ClientGone, Close, EventSocket
from services.gateway.pagination import CursorParam, SinceParam, limit_param, utc
from services.gateway.resources import Resources

log = logging.getLogger(__name__)

# A close frame that a client does not take within this long is given up on.
CLOSE_TIMEOUT_S = 5.0

SHARED_FEEDS_KEY = "shared_feeds"
READ = [requires(Permission.READ)]
HOMES = (
    " Whoever is not an administrator gets only the messages about its homes (their "
    "devices, rules, subscriptions and locations), whatever the filter; dead letters and "
    "what belongs to no home are for administrators."
)

SubjectParam = Annotated[
    str,
    QueryParameter(
        description="subject filter: `*` matches one token, `>` the rest (`events.light-1.>`)",
        max_length=512,
    ),
]
SinceSeqParam = Annotated[
    int | None, QueryParameter(ge=0, description="stream sequence: start after this one")
]


def provide_event_service(resources: NamedDependency[Resources], state: State) -> EventService:
    return EventService(
        resources.nc,
        resources.js,
        resources.shutdown,
        provide_shared_feeds(state, resources),
        resources.bus_storage,
    )


def provide_shared_feeds(state: State, resources: Resources) -> SharedFeeds:
    """The app's live feeds (one consumer per followed filter), made with its bus connection
    and closed when the gateway is asked to stop (the lifespan's drain ends the rest)."""
    feeds: SharedFeeds | None = state.get(SHARED_FEEDS_KEY)
    if feeds is None or feeds.js is not resources.js:
        feeds = state[SHARED_FEEDS_KEY] = SharedFeeds(resources.js)
        resources.shutdown.on_request(feeds.close_soon)
    return feeds


class EventController(Controller):
    path = "/events"
    tags = ["events"]
    dependencies = {
        "events": Provide(provide_event_service, sync_to_thread=False),
        "correlation_id": Provide(provide_correlation_id, sync_to_thread=False),
        "stream_limits": Provide(provide_stream_limits, sync_to_thread=False),
    }

    @post(
        "/",
        dto=StrictBody[PublishBody],
        operation_id="publishEvents",
        summary="Publish a CloudEvent, or an array of them, to the bus",
        description=(
            f"One CloudEvent answers one result; an array (at most {MAX_BATCH}) answers "
            "`{results: [...]}` in the same order. The event `id` de-duplicates: a repeat "
            "within the stream's window answers `duplicate: true` and is not stored again. "
            "An installer publishes for the devices of its homes (another one answers 404, "
            "and nothing of the batch is published)."
        ),
        status_code=HTTP_202_ACCEPTED,
        guards=[requires(Permission.PUBLISH)],
    )
    async def publish(
        self,
        events: NamedDependency[EventService],
        resources: NamedDependency[Resources],
        principal: NamedDependency[Principal],
        data: JSONBody[PublishBody],
        correlation_id: NamedDependency[str],
    ) -> Published | PublishedBatch:
        batch = data if isinstance(data, list) else [data]
        await scope.own_devices(principal, resources.sessions, (e.subject for e in batch))
        if isinstance(data, list):
            return PublishedBatch(results=await events.publish(data, correlation_id))
        return (await events.publish([data], correlation_id))[0]

    @get(
        "/",
        operation_id="replayEvents",
        summary="Replay stored messages in stream order",
        description=(
            "From the start of the stream, after `since_seq`, or from the time `since`. "
            "Pass `next_cursor` back as `cursor` for the next page."
            + HOMES
            + f" Their page holds what they see of the next {MAX_SCAN:,} messages, perhaps "
            "fewer than `limit` (even none): follow `next_cursor` until it is null."
        ),
        guards=READ,
    )
    async def replay(
        self,
        events: NamedDependency[EventService],
        resources: NamedDependency[Resources],
        principal: NamedDependency[Principal],
        state: State,
        subject: SubjectParam = "events.>",
        since_seq: SinceSeqParam = None,
        since: SinceParam = None,
        cursor: CursorParam = None,
        limit: Annotated[int, limit_param(100, 1000)] = 100,
    ) -> EventPage:
        if since_seq is not None and since is not None:
            raise Invalid("give `since_seq` or `since`, not both", field="since")
        return await events.replay(
            subject,
            after_seq=since_seq,
            since=utc(since),
            limit=limit,
            cursor=cursor,
            audience=await scope.audience(principal, state, resources),
        )

    @get(
        "/stream",
        operation_id="streamEvents",
        media_type="text/event-stream",
        response_description="A stream of Server-Sent Events",
        summary="Follow messages live (Server-Sent Events)",
        description=(
            "Each event has `id:` = stream sequence, `event:` = subject, `data:` = the message. "
            "Resumes after `Last-Event-ID` (or `since_seq`); otherwise only new messages. "
            f"A comment every {HEARTBEAT_S:g}s keeps the connection open. A client that falls "
            f"{FEED_CAPACITY} messages behind gets a final `event: error` and can resume. A client "
            "address holds at most `SMARTHOME_MAX_STREAMS_PER_CLIENT` streams (SSE and "
            "WebSocket together): one more is answered 429. The same over a WebSocket, several "
            "filters on one socket: `GET /api/v1/events/ws` (JSON messages `subscribe`, "
            "`unsubscribe`, `ack`; answers `subscribed`, `event`, `unsubscribed`, `error`, `ping`)."
            + HOMES
        ),
        guards=READ,
    )
    async def stream(
        self,
        request: Request,
        events: NamedDependency[EventService],
        stream_limits: NamedDependency[StreamLimits],
        resources: NamedDependency[Resources],
        principal: NamedDependency[Principal],
        state: State,
        subject: SubjectParam = "events.>",
        since_seq: SinceSeqParam = None,
        last_event_id: Annotated[str | None, HeaderParameter(name="Last-Event-ID")] = None,
    ) -> ServerSentEvents:
        # A reconnecting EventSource repeats the URL (`since_seq`) and adds Last-Event-ID,
        # which is the more recent of the two.
        after = _last_event_id(last_event_id) if last_event_id else since_seq
        audience = await scope.audience(principal, state, resources)
        release = stream_limits.open(stream_owner(request))
        try:
            feed = await events.follow(subject, after, audience=audience)
        except BaseException:
            release()
            raise
        return ServerSentEvents(feed, release)

    @websocket("/ws", name="events-ws", guards=READ)
    async def follow_socket(
        self,
        socket: WebSocket[Principal, object, State],
        events: NamedDependency[EventService],
        stream_limits: NamedDependency[StreamLimits],
        resources: NamedDependency[Resources],
        state: State,
    ) -> None:
        """Follow messages live over a WebSocket: see `services.gateway.events.websocket`."""
        try:
            release = stream_limits.open(stream_owner(socket))
        except TooManyStreams:
            await socket.accept()
            await socket.close(
                WS_1013_TRY_AGAIN_LATER,
                f"too many live streams from this client (at most {stream_limits.per_client}); "
                "close one and try again",
            )
            return
        try:
            audience = await scope.audience(socket.user, state, resources)
            await socket.accept()
            session = EventSocket(events, _sender(socket), audience=audience)
            try:
                close = await session.run(_receiver(socket))
            except Exception:
                log.exception("event socket failed")
                close = Close(WS_1011_INTERNAL_ERROR, "internal error; reconnect and resubscribe")
            if close is not None:
                with contextlib.suppress(WebSocketDisconnect, OSError, TimeoutError):
                    async with asyncio.timeout(CLOSE_TIMEOUT_S):
                        await socket.close(close.code, close.reason)
        finally:
            release()


def _sender(socket: WebSocket) -> Callable[[bytes], Awaitable[None]]:
    async def send(frame: bytes) -> None:
        try:
            await socket.send_data(frame, mode="text")
        except (WebSocketDisconnect, OSError) as exc:  # uvicorn: ClientDisconnected
            raise ClientGone from exc

    return send


def _receiver(socket: WebSocket) -> Callable[[], Awaitable[str | bytes | None]]:
    async def receive() -> str | bytes | None:
        try:
            event = await socket.receive()
        except WebSocketDisconnect:
            return None
        if event["type"] != "websocket.receive":
            return None
        return event.get("text") or event.get("bytes") or ""

    return receive


def _last_event_id(value: str) -> int:
    try:
        seq = int(value)
    except ValueError:
        seq = -1
    if seq < 0:
        raise Invalid("must be a stream sequence number", field="Last-Event-ID")
    return seq
