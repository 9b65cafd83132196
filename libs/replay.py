"""A bounded read of what a stream stored: the messages on a subject filter from a sequence
or a time, at most N of them, within a deadline.

For a reader that asks once and goes (the gateway's `GET /events`), not a worker: an
ephemeral pull consumer (no acks, in memory, removed by the server if this process dies
before it deletes it) that exists for one read. Its `num_pending` says how many messages
match from the start, so the read never waits for more than are stored; a message removed
since it was counted (the stream's limits) ends the read early, with what it has.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from libs import bus, subjects
from libs import messages as m

# A replay consumer this process failed to delete (a crash) is removed by the server then.
IDLE_S = 30.0
DEADLINE_S = 10.0
# Passing over messages the reader does not keep: read this many at once.
SCAN_BATCH = 500


@dataclass(frozen=True, slots=True)
class Stored:
    """A message as the stream stored it."""

    seq: int
    subject: str
    time: datetime
    data: bytes
    headers: Mapping[str, str] | None


@dataclass(frozen=True, slots=True)
class Page:
    messages: list[Stored]
    last_seen: int  # the stream sequence of the last message looked at (0: none)
    more: bool  # more matched after it


def start(after_seq: int | None = None, since: datetime | None = None) -> ConsumerConfig:
    """Where a read begins: after `after_seq`, else at `since`, else at the stream's start."""
    if after_seq is not None:
        return ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after_seq + 1
        )
    if since is not None:
        return ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=since)
    return ConsumerConfig(deliver_policy=DeliverPolicy.ALL)


async def read(
    js: JetStreamContext,
    stream: str,
    subject: str,
    *,
    limit: int,
    after_seq: int | None = None,
    since: datetime | None = None,
    keep: Callable[[str], bool] | None = None,
    scan: int | None = None,
    deadline_s: float = DEADLINE_S,
) -> Page:
    """Up to `limit` messages on `subject` in stream order, after `after_seq` or from `since`.

    With `keep` (a subject test) the others are passed over: at most `scan` messages are
    looked at then (at least `limit`), so a page may hold fewer than `limit`. `more` says
    whether more matched after the last one looked at; the read ends at `deadline_s`, with
    what it has."""
    config = start(after_seq, since)
    config.name = f"replay-{m.new_id()}"
    config.filter_subject = await bus.stored_filter(js, subject)
    config.ack_policy = AckPolicy.NONE
    config.inactive_threshold = IDLE_S
    config.mem_storage = True
    config.num_replicas = 1
    info = await js.add_consumer(stream, config)
    try:
        matching = info.num_pending or 0
        bound = matching if keep is None else min(matching, max(limit, scan or matching))
        if min(limit, bound) == 0:
            return Page([], 0, False)
        return await _take(js, stream, config.name, limit, bound, matching, keep, deadline_s)
    finally:
        with contextlib.suppress(nats.errors.Error):
            await js.delete_consumer(stream, config.name)


async def _take(
    js: JetStreamContext,
    stream: str,
    name: str,
    limit: int,
    bound: int,
    matching: int,
    keep: Callable[[str], bool] | None,
    deadline_s: float,
) -> Page:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    subscription = await js.pull_subscribe_bind(consumer=name, stream=stream)
    taken: list[Stored] = []
    seen, last_seen = 0, 0
    try:
        while len(taken) < limit and seen < bound:
            left = deadline - loop.time()
            if left <= 0:
                break
            # Passing over others' messages, read more at once; what is read beyond the page
            # is read again by the next one (it goes on after the last one taken).
            want = limit - len(taken) if keep is None else max(limit, SCAN_BATCH)
            try:
                msgs = await subscription.fetch(min(want, bound - seen), timeout=left)
            except nats.errors.TimeoutError:
                break  # removed since counted (age or size limits): answer what we have
            for msg in msgs:
                seen += 1
                meta = msg.metadata
                last_seen = meta.sequence.stream
                subject = subjects.published(msg.subject)
                if keep is None or keep(subject):
                    taken.append(Stored(last_seen, subject, meta.timestamp, msg.data, msg.headers))
                    if len(taken) == limit:
                        break
    finally:
        await subscription.unsubscribe()
    return Page(taken, last_seen, seen > 0 and matching > seen)
