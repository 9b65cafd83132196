"""`bus.publish_many` against a real server: the acks of a batch in order, a refusal raised at
once (not after the timeout), no answer a TimeoutError that says how many are missing, and
nothing left waiting in the connection's ack inbox after any of them."""

from __future__ import annotations

import time

import pytest
from nats.js.errors import NoStreamResponseError

from libs import bus
from tests.consumers import scratch_stream
from tests.helpers import unique_id


def _waiting(nc) -> int:  # type: ignore[no-untyped-def]
    return len(bus._ack_inboxes[nc]._waiting)


async def test_the_acks_come_back_in_the_order_published(nc, js) -> None:  # type: ignore[no-untyped-def]
    async with scratch_stream(js, "many") as (stream, prefix):
        ids = [unique_id("m") for _ in range(3)]
        messages = [(f"{prefix}.{n}", f"{n}".encode(), ids[n]) for n in range(3)]
        acks = await bus.publish_many(js, messages)
        again = await bus.publish_many(js, messages[1:2])  # the same id: a duplicate
    assert [a.stream for a in acks] == [stream] * 3
    assert [a.seq for a in acks] == [1, 2, 3]
    assert not any(a.duplicate for a in acks)
    assert again[0].seq == 2 and again[0].duplicate
    assert _waiting(nc) == 0


async def test_a_message_no_stream_takes_is_refused_at_once(nc, js) -> None:  # type: ignore[no-untyped-def]
    async with scratch_stream(js, "many") as (_, prefix):
        messages = [(f"{prefix}.ok", b"1", None), ("nowhere.at.all", b"2", None)]
        started = time.monotonic()
        with pytest.raises(NoStreamResponseError):
            await bus.publish_many(js, messages, timeout=30)
    assert time.monotonic() - started < 5  # the refusal, not the 30 s timeout
    assert _waiting(nc) == 0


async def test_no_answer_times_out_saying_how_many_are_missing(nc, js) -> None:  # type: ignore[no-untyped-def]
    subject = f"silent.{unique_id('s')}"
    listener = await nc.subscribe(subject)  # takes it, never answers: no "no responders"
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=r"1 of 1 acks did not come in 0\.5 s"):
            await bus.publish_many(js, [(subject, b"x", None)], timeout=0.5)
        waited = time.monotonic() - started
    finally:
        await listener.unsubscribe()
    assert 0.5 <= waited < 5
    assert _waiting(nc) == 0
