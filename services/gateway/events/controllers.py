"""`/api/v1/events`: publish, replay and follow (Server-Sent Events)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Annotated

import msgspec
from litestar import Controller, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import HeaderParameter, JSONBody, QueryParameter
from litestar.response import ServerSentEvent, ServerSentEventMessage
from litestar.status_codes import HTTP_202_ACCEPTED

from libs.errors import Invalid
from services.gateway.body import StrictBody
from services.gateway.correlation import provide_correlation_id
from services.gateway.events.schemas import (
    MAX_BATCH,
    EventPage,
    PublishBody,
    Published,
    PublishedBatch,
)
from services.gateway.events.service import (
    FEED_CAPACITY,
    EventService,
    FeedClosed,
    FeedOverflow,
    LiveFeed,
)
from services.gateway.pagination import CursorParam, SinceParam, limit_param, utc
from services.gateway.resources import Resources

HEARTBEAT_S = 15.0

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


def provide_event_service(resources: NamedDependency[Resources]) -> EventService:
    return EventService(resources.nc, resources.js, resources.shutdown)


class EventController(Controller):
    path = "/events"
    tags = ["events"]
    dependencies = {
        "events": Provide(provide_event_service, sync_to_thread=False),
        "correlation_id": Provide(provide_correlation_id, sync_to_thread=False),
    }

    @post(
        "/",
        dto=StrictBody[PublishBody],
        operation_id="publishEvents",
        summary="Publish a CloudEvent, or an array of them, to the bus",
        description=(
            f"One CloudEvent answers one result; an array (at most {MAX_BATCH}) answers "
            "`{results: [...]}` in the same order. The event `id` de-duplicates: a repeat "
            "within the stream's window answers `duplicate: true` and is not stored again."
        ),
        status_code=HTTP_202_ACCEPTED,
    )
    async def publish(
        self,
        events: NamedDependency[EventService],
        data: JSONBody[PublishBody],
        correlation_id: NamedDependency[str],
    ) -> Published | PublishedBatch:
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
        ),
    )
    async def replay(
        self,
        events: NamedDependency[EventService],
        subject: SubjectParam = "events.>",
        since_seq: SinceSeqParam = None,
        since: SinceParam = None,
        cursor: CursorParam = None,
        limit: Annotated[int, limit_param(100, 1000)] = 100,
    ) -> EventPage:
        if since_seq is not None and since is not None:
            raise Invalid("give `since_seq` or `since`, not both", field="since")
        return await events.replay(
            subject, after_seq=since_seq, since=utc(since), limit=limit, cursor=cursor
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
            f"{FEED_CAPACITY} messages behind gets a final `event: error` and can resume."
        ),
    )
    async def stream(
        self,
        events: NamedDependency[EventService],
        subject: SubjectParam = "events.>",
        since_seq: SinceSeqParam = None,
        last_event_id: Annotated[str | None, HeaderParameter(name="Last-Event-ID")] = None,
    ) -> ServerSentEvent:
        # A reconnecting EventSource repeats the URL (`since_seq`) and adds Last-Event-ID,
        # which is the more recent of the two.
        after = _last_event_id(last_event_id) if last_event_id else since_seq
        feed = await events.follow(subject, after)
        return ServerSentEvent(_server_sent_events(feed))


def _last_event_id(value: str) -> int:
    try:
        seq = int(value)
    except ValueError:
        seq = -1
    if seq < 0:
        raise Invalid("must be a stream sequence number", field="Last-Event-ID")
    return seq


async def _server_sent_events(feed: LiveFeed) -> AsyncGenerator[ServerSentEventMessage, None]:
    try:
        # Tells the client that the subscription is in place (what follows is live).
        yield ServerSentEventMessage(comment="subscribed", data=None)
        while True:
            try:
                message = await feed.next(timeout=HEARTBEAT_S)
            except FeedOverflow:
                detail = (
                    f"the client fell {FEED_CAPACITY} messages behind and was disconnected; "
                    "reconnect with Last-Event-ID to resume"
                )
                yield ServerSentEventMessage(
                    event="error", data=msgspec.json.encode({"detail": detail}).decode()
                )
                return
            except FeedClosed:
                return  # the gateway is stopping; the client reconnects with Last-Event-ID
            if message is None:
                yield ServerSentEventMessage(comment="heartbeat", data=None)
                continue
            yield ServerSentEventMessage(
                id=message.seq,
                event=message.subject,
                data=message.data.decode("utf-8", errors="replace"),
            )
    finally:
        await feed.close()
