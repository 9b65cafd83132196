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
