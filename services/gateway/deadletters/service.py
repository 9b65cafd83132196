"""The DEADLETTER stream, read by sequence: the list, and a redrive that sends a message back
to the subject it was on.

A redrive publishes the message again with its own headers (the dead-letter ones dropped),
then deletes it from DEADLETTER once the bus has acknowledged the new copy. Deleting is what
marks it redriven: the stream holds what still waits for an operator, and a message sent
back waits no more; who sent it back, when and where it went is in the audit log. The new
copy's `Nats-Msg-Id` is derived from the dead letter's sequence, so two redrives racing, or
one retried after a crash between the publish and the delete (within the stream's
de-duplication window), store it once; the one that finds it deleted answers 404.
"""

from __future__ import annotations

from collections.abc import Mapping

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import NotFoundError

from libs import bus, subjects
from libs import messages as m
from libs.errors import Conflict, Invalid, NotFound
from services.gateway.deadletters.schemas import DeadLetter, DeadLetterPage, Redriven
from services.gateway.pagination import decode_cursor, encode_cursor
from services.gateway.resources import require_bus

PREVIEW_BYTES = 1024
# Stream sequences are the server's unsigned 64-bit numbers; one beyond is a bad request.
MAX_SEQ = 2**63 - 1
# A page filtered by consumer looks at most this many dead letters (then `next_cursor`).
MAX_SCAN = 1000
# What `bus.dead_letter` adds; the rest of the headers (traceparent...) go back with it.
DEAD_LETTER_HEADERS = frozenset(
    {bus.MSG_ID, bus.DL_REASON, bus.DL_CONSUMER, bus.DL_STREAM, bus.DL_STREAM_SEQ}
)


def redrive_msg_id(seq: int) -> str:
    return f"redrive:{subjects.DEADLETTER_STREAM}:{seq}"


class DeadLetterService:
    def __init__(self, nc: NATS, js: JetStreamContext) -> None:
        self._nc = nc
        self._js = js

    async def list(
        self, subject: str, consumer: str | None, limit: int, cursor: str | None
    ) -> DeadLetterPage:
        """Dead letters whose original subject matches `subject` (wildcards), oldest first;
        with `consumer`, only those it gave up on (among the next `MAX_SCAN`)."""
        if not subjects.is_filter(subject):
            raise Invalid("must be a subject filter (tokens, `*`, `>` last)", field="subject")
        if consumer is not None and not subjects.is_token(consumer):
            raise Invalid("must be a consumer name (A-Z a-z 0-9 _ -)", field="consumer")
        after = decode_cursor(cursor, int) if cursor else 0
        if not 0 <= after < MAX_SEQ:
            raise Invalid("not a cursor this API returned", field="cursor")
        require_bus(self._nc)
        items: list[DeadLetter] = []
        seen = 0
        while len(items) < limit and seen < MAX_SCAN:
            raw = await self._next(after + 1, subjects.deadletter(subject))
            if raw is None:
                return DeadLetterPage(items=items, next_cursor=None)
            seen += 1
            after = raw.seq or after + 1
            letter = _letter(raw)
            if consumer is None or letter.consumer == consumer:
                items.append(letter)
        more = await self._next(after + 1, subjects.deadletter(subject)) is not None
        return DeadLetterPage(items=items, next_cursor=encode_cursor(after) if more else None)

    async def _next(self, seq: int, filter_subject: str) -> RawStreamMsg | None:
        try:
            return await self._js.get_msg(
                subjects.DEADLETTER_STREAM, seq, subject=filter_subject, next=True
            )
        except NotFoundError:
            return None

    async def redrive(self, seq: int, actor: str, correlation_id: str) -> Redriven:
        """Publish dead letter `seq` back to its original subject, delete it, audit it."""
        require_bus(self._nc)
        missing = f"no dead letter has sequence {seq} (never one, or redriven already)"
        try:
            raw = await self._js.get_msg(subjects.DEADLETTER_STREAM, seq)
        except NotFoundError:
            raise NotFound(missing) from None
        letter = _letter(raw)
        if subjects.stream_of(letter.original_subject) is None:
            raise Conflict(f"no stream takes {letter.original_subject!r}: it cannot go back")
        headers = {k: v for k, v in (raw.headers or {}).items() if k not in DEAD_LETTER_HEADERS}
        headers[bus.MSG_ID] = redrive_msg_id(seq)
        with bus.storage_refusals():
            ack = await self._js.publish(letter.original_subject, raw.data or b"", headers=headers)
        try:
            await self._js.delete_msg(subjects.DEADLETTER_STREAM, seq)
        except NotFoundError:
            raise NotFound(missing) from None  # a redrive racing this one deleted it first
        redriven = Redriven(
            seq=seq, subject=letter.original_subject, stream=ack.stream, new_seq=ack.seq
        )
        await self._audit(letter, redriven, actor, correlation_id)
        return redriven

    async def _audit(
        self, letter: DeadLetter, redriven: Redriven, actor: str, correlation_id: str
    ) -> None:
        fact = m.ChangeFact(
            what="deadletter",
            id=str(letter.seq),
            change="redriven",
            actor=actor,
            correlation_id=correlation_id,
            time=m.now(),
            detail={
                "subject": letter.original_subject,
                "reason": letter.reason,
                "consumer": letter.consumer,
                "original_stream": letter.original_stream,
                "original_seq": letter.original_seq,
                "stream": redriven.stream,
                "new_seq": redriven.new_seq,
            },
        )
        await bus.publish(
            self._js,
            subjects.deadletter_changed(letter.seq),
            fact,
            msg_id=f"audit:{redrive_msg_id(letter.seq)}",
        )


def _letter(raw: RawStreamMsg) -> DeadLetter:
    headers: Mapping[str, str] = raw.headers or {}
    data = raw.data or b""
    subject = raw.subject or ""
    original = subjects.classify(subject).original
    stream_seq = headers.get(bus.DL_STREAM_SEQ, "")
    return DeadLetter(
        seq=raw.seq or 0,
        subject=subject,
        original_subject=original,
        reason=headers.get(bus.DL_REASON, ""),
        consumer=headers.get(bus.DL_CONSUMER, ""),
        time=raw.time or m.now(),
        original_stream=headers.get(bus.DL_STREAM),
        original_seq=int(stream_seq) if stream_seq.isdigit() else None,
        size=len(data),
        preview=data[:PREVIEW_BYTES].decode("utf-8", errors="replace"),
        truncated=len(data) > PREVIEW_BYTES,
    )
