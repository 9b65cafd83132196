"""Dead-letter bodies: what the list and a redrive answer."""

from __future__ import annotations

from datetime import datetime

import msgspec


class DeadLetter(msgspec.Struct, frozen=True):
    """A message a worker could not decode or apply: where it was (`original_subject`,
    `original_stream`, `original_seq`), who gave up on it (`consumer`) and why (`reason`).
    `preview`: the start of its body as text (`truncated` when `size` is larger)."""

    seq: int  # in the DEADLETTER stream: what `redrive` takes
    subject: str
    original_subject: str
    reason: str
    consumer: str
    time: datetime
    original_stream: str | None
    original_seq: int | None
    size: int
    preview: str
    truncated: bool


class DeadLetterPage(msgspec.Struct, frozen=True):
    """A page of dead letters, oldest first; `next_cursor` continues it."""

    items: list[DeadLetter]
    next_cursor: str | None


class Redriven(msgspec.Struct, frozen=True):
    """Dead letter `seq` published again to `subject`: stored in `stream` at `new_seq`."""

    seq: int
    subject: str
    stream: str
    new_seq: int
