"""Event bodies: what `POST /events` takes and answers, what a replay answers."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec

from libs.messages import CloudEvent

MAX_BATCH = 500

# One CloudEvent, or a JSON array of up to 500.
EventBatch = Annotated[list[CloudEvent], msgspec.Meta(min_length=1, max_length=MAX_BATCH)]
PublishBody = CloudEvent | EventBatch


class Published(msgspec.Struct, frozen=True):
    """Where the bus stored an event; `duplicate`: the id was seen within the stream's
    de-duplication window, and the event was not stored again (`seq` is the first one's)."""

    id: str
    stream: str
    seq: int
    duplicate: bool


class PublishedBatch(msgspec.Struct, frozen=True):
    results: list[Published]


class BusMessage(msgspec.Struct, frozen=True):
    """A stored bus message: its stream sequence, subject, stream time and JSON body."""

    seq: int
    subject: str
    time: datetime
    event: Any


class EventPage(msgspec.Struct, frozen=True):
    """A page of stored messages, in stream order; `next_cursor` continues it."""

    items: list[BusMessage]
    next_cursor: str | None


# --- `/events/ws`: the WebSocket protocol (JSON text frames, tagged by `type`) ------------------

SubscriptionId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
SeqNumber = Annotated[int, msgspec.Meta(ge=0)]


class Subscribe(msgspec.Struct, tag="subscribe", tag_field="type", forbid_unknown_fields=True):
    """Follow `subject` on this socket as subscription `id`: after `since_seq`, else new only."""

    id: SubscriptionId
    subject: Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
    since_seq: SeqNumber | None = None


class Unsubscribe(msgspec.Struct, tag="unsubscribe", tag_field="type", forbid_unknown_fields=True):
    id: SubscriptionId


class Ack(msgspec.Struct, tag="ack", tag_field="type", forbid_unknown_fields=True):
    """The client has handled subscription `id` up to stream sequence `seq`."""

    id: SubscriptionId
    seq: SeqNumber


ClientMessage = Subscribe | Unsubscribe | Ack


class Subscribed(msgspec.Struct, tag="subscribed", tag_field="type", frozen=True):
    id: str
    subject: str


class EventFrame(msgspec.Struct, tag="event", tag_field="type", frozen=True):
    """One bus message on subscription `id`; `data` is the message as stored (JSON)."""

    id: str
    seq: int
    subject: str
    data: msgspec.Raw


class Unsubscribed(msgspec.Struct, tag="unsubscribed", tag_field="type", frozen=True):
    id: str


class ErrorFrame(msgspec.Struct, tag="error", tag_field="type", frozen=True):
    """A client message was refused; `field` is a JSON path into it, `id` its subscription."""

    field: str | None
    message: str
    id: str | None = None


class Ping(msgspec.Struct, tag="ping", tag_field="type", frozen=True):
    pass


ServerFrame = Subscribed | EventFrame | Unsubscribed | ErrorFrame | Ping
