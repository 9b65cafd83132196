"""The consumer runtime's pure decisions: back-off, what to read after lost deliveries, what
a consumer left un-acked, and how a batch is settled by the worker's verdicts; and a handler
settling the prefix of its batch it finished (`Consumer.settle`), with stand-in messages."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
from nats.aio.msg import Msg
from nats.errors import NotJSMessageError
from nats.js.api import AckPolicy, ConsumerConfig
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from libs import tracing
from libs.consumer import (
    Consumer,
    Dead,
    Delivery,
    Item,
    Nak,
    Retry,
    Verdict,
    backoff,
    filters,
    missing,
    plan,
    unacked,
)
from libs.pull import Gaps, Reply

NOW = datetime(2024, 1, 1, tzinfo=UTC)


class FakeMsg:
    def __init__(self, seq: int) -> None:
        self.seq = seq

    def __repr__(self) -> str:
        return f"msg{self.seq}"


def delivered(seq: int) -> Delivery:
    return Delivery("events.d.x", b"{}", None, "EVENTS", seq, NOW, 1, FakeMsg(seq))  # type: ignore[arg-type]


def read(seq: int) -> Delivery:
    return Delivery("events.d.x", b"{}", None, "EVENTS", seq, NOW, 0, None)


def test_backoff_doubles_up_to_its_ceiling() -> None:
    assert [backoff(n) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert backoff(10_000) == 5.0


@pytest.mark.parametrize(
    ("after", "batch", "expected"),
    [
        (10, [11, 12], None),  # nothing before the batch
        (10, [14, 15], range(11, 16)),  # 11-13 lost before it
        (10, [11, 15], range(11, 16)),  # 12-14 lost inside it
        (10, [], None),
        (10, [9], None),  # a redelivery of what was settled
    ],
)
def test_what_is_read_after_lost_deliveries(after: int, batch: list[int], expected) -> None:  # type: ignore[no-untyped-def]
    assert missing(after, batch) == expected


def test_what_a_consumer_left_unacked_is_after_its_ack_floor() -> None:
    info = SimpleNamespace(
        ack_floor=SimpleNamespace(stream_seq=40), delivered=SimpleNamespace(stream_seq=45)
    )
    assert unacked(info) == range(41, 46)  # type: ignore[arg-type]
    fresh = SimpleNamespace(ack_floor=None, delivered=None)
    assert not unacked(fresh)  # type: ignore[arg-type]


def test_a_consumers_filters() -> None:
    assert filters(ConsumerConfig(filter_subject="events.>")) == ["events.>"]
    assert filters(ConsumerConfig(filter_subjects=["a.>", "b.>"])) == ["a.>", "b.>"]
    assert filters(ConsumerConfig()) == [">"]


def test_ack_all_acks_the_highest_delivered_once_after_the_dead_letters() -> None:
    batch = [read(11), delivered(13), delivered(12), read(14)]
    todo = plan(True, batch, {12: Dead("bad", "undecodable")})
    assert [d.seq for d, _ in todo.dead] == [12]
    assert [m.seq for m in todo.ack] == [13]  # type: ignore[attr-defined]
    assert todo.acked == 4 and not todo.nak and not todo.term


def test_ack_all_with_nothing_delivered_acks_nothing() -> None:
    todo = plan(True, [read(1), read(2)], {})
    assert not todo.ack and todo.acked == 0


def test_ack_all_refuses_a_nak_that_a_later_ack_would_cover() -> None:
    with pytest.raises(ValueError, match="EXPLICIT"):
        plan(True, [delivered(1)], {1: Nak(1.0)})


def test_explicit_settles_each_delivered_message_by_its_verdict() -> None:
    batch = [delivered(1), delivered(2), delivered(3), read(4)]
    todo = plan(False, batch, {2: Nak(3.0), 3: Dead("gone")})
    assert [m.seq for m in todo.ack] == [1]  # type: ignore[attr-defined]
    assert [(m.seq, delay) for m, delay in todo.nak] == [(2, 3.0)]  # type: ignore[attr-defined]
    assert [m.seq for m in todo.term] == [3]  # type: ignore[attr-defined]
    assert [d.seq for d, _ in todo.dead] == [3]
    assert todo.acked == 1


def note(gaps: Gaps, *consumer_seqs: int) -> bool:
    for seq in consumer_seqs:
        gaps.note(seq)
    return gaps.take()


def test_a_jump_of_the_consumer_sequence_is_a_lost_delivery() -> None:
    gaps = Gaps()
    assert not note(gaps, 1, 2, 3)
    assert note(gaps, 5)
    assert not gaps.take()  # told once
    assert not note(gaps, 6)


def test_a_reader_bound_after_deliveries_counts_from_the_last_one_made() -> None:
    assert note(Gaps(last=10), 12)  # 11 was handed out on the way here and lost
    assert not note(Gaps(last=10), 11)
    assert not note(Gaps(), 12)  # not knowing, the first is taken as it comes


# Reply subjects as a nats-server 2.x sent them: a first delivery with a large pending count,
# the redelivery (after a nak) of stream sequence 1 as consumer sequence 3, and the form with
# a domain and an account hash (nats-py reads both; a server with a domain sends the second).
REPLIES = [
    "$JS.ACK.CAP.c.1.1.1.1796584292542264099.100050",
    "$JS.ACK.CAP.c.2.1.3.1796584292542264099.100049",
    "$JS.ACK.hub.ACCHASH.EVENTS.recorder.3.123456789012.98765.1796584292550845044.7.abc",
    "$JS.ACK.hub.ACCHASH.EVENTS.recorder.1.5.6.1796584292550850783.0",
]


def js_msg(reply: str) -> Msg:
    return Msg(None, subject="events.d1.reading.3", reply=reply, data=b"{}")  # type: ignore[arg-type]


@pytest.mark.parametrize("reply", REPLIES)
def test_a_reply_subject_says_what_nats_py_reads_from_it(reply: str) -> None:
    meta = Msg.Metadata._from_reply(reply)
    got = Reply.of(js_msg(reply))
    assert got == (
        meta.stream,
        meta.sequence.stream,
        meta.sequence.consumer,
        meta.num_delivered,
        got.timestamp_ns,
        meta.num_pending,
    )
    d = Delivery.of(js_msg(reply), got)
    assert (d.stream, d.seq, d.delivered, d.time) == (
        meta.stream,
        meta.sequence.stream,
        meta.num_delivered,
        meta.timestamp,
    )
    assert d.subject == "events.d1.reading"  # as published: its partition gone


def test_the_redelivered_one_and_the_large_pending_count() -> None:
    first, again = (Reply.of(js_msg(r)) for r in REPLIES[:2])
    assert (first.delivered, first.consumer_seq, first.pending) == (1, 1, 100_050)
    assert (again.delivered, again.stream_seq, again.consumer_seq) == (2, 1, 3)
    assert Delivery.of(js_msg(REPLIES[0])).time == datetime(
        2026, 12, 6, 19, 11, 32, 542264, tzinfo=UTC
    )


@pytest.mark.parametrize("reply", ["", "_INBOX.x.y", "$JS.ACK.CAP.c.1.1"])
def test_not_a_jetstream_delivery_is_refused_as_nats_py_refuses_it(reply: str) -> None:
    with pytest.raises(NotJSMessageError):
        Reply.of(js_msg(reply))


# --- a handler settling what it finished ---------------------------------------------------------


class SettlingMsg:
    """A delivered message that writes down how it was settled."""

    def __init__(self, seq: int, settled: list[tuple[str, int]]) -> None:
        self.seq = seq
        self._settled = settled

    async def ack(self) -> None:
        self._settled.append(("ack", self.seq))

    async def nak(self, delay: float | None = None) -> None:
        self._settled.append(("nak", self.seq))

    async def term(self) -> None:
        self._settled.append(("term", self.seq))

    async def in_progress(self) -> None:
        pass


def runtime(policy: AckPolicy, handle: Any) -> Consumer[int]:
    config = ConsumerConfig(durable_name="d", ack_policy=policy)
    nc = SimpleNamespace(jetstream=lambda: None)
    return Consumer(nc, "EVENTS", config, lambda d: d.seq, handle)  # type: ignore[arg-type]


def batch_of(settled: list[tuple[str, int]], *seqs: int) -> list[Delivery]:
    return [
        Delivery("events.d.x", b"{}", None, "EVENTS", seq, NOW, 1, SettlingMsg(seq, settled))  # type: ignore[arg-type]
        for seq in seqs
    ]


async def test_a_settled_prefix_is_acked_at_once_and_not_handled_again_after_a_retry() -> None:
    settled: list[tuple[str, int]] = []
    calls: list[list[int]] = []

    async def handle(items: list[Item[int]]) -> None:
        calls.append([i.value for i in items])
        if len(calls) == 1:
            await consumer.settle(2)
            assert settled == [("ack", 2)]  # at once, not when the handler returns
            raise Retry("the endpoint is failing")

    consumer = runtime(AckPolicy.ALL, handle)
    assert await consumer._process(batch_of(settled, 1, 2, 3, 4), asyncio.Event())
    assert calls == [[1, 2, 3, 4], [3, 4]]
    assert settled == [("ack", 2), ("ack", 4)]


async def test_a_stop_after_a_settled_prefix_leaves_only_the_rest_unacked() -> None:
    settled: list[tuple[str, int]] = []
    stop = asyncio.Event()

    async def handle(items: list[Item[int]]) -> None:
        await consumer.settle(1)
        stop.set()
        raise Retry("stopping")

    consumer = runtime(AckPolicy.ALL, handle)
    assert not await consumer._process(batch_of(settled, 1, 2, 3), stop)
    assert settled == [("ack", 1)]


async def test_explicit_settles_the_prefix_message_by_message_with_its_verdicts() -> None:
    settled: list[tuple[str, int]] = []

    async def handle(items: list[Item[int]]) -> dict[int, Verdict]:
        await consumer.settle(2, {2: Nak(1.0)})
        return {3: Nak(1.0)}

    consumer = runtime(AckPolicy.EXPLICIT, handle)
    assert await consumer._process(batch_of(settled, 1, 2, 3, 4), asyncio.Event())
    assert settled == [("ack", 1), ("nak", 2), ("ack", 4), ("nak", 3)]


async def test_settle_is_for_a_handler_while_it_runs() -> None:
    consumer = runtime(AckPolicy.ALL, None)
    with pytest.raises(RuntimeError, match="while it runs"):
        await consumer.settle(1)


# --- traces -------------------------------------------------------------------------------------

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    yield exporter
    tracing.install(None)


def seq_of(span: ReadableSpan) -> Any:
    return (span.attributes or {})["messaging.nats.stream.sequence"]


def carrying(settled: list[tuple[str, int]], seq: int, traceparent: str | None) -> Delivery:
    headers = {"traceparent": traceparent} if traceparent else None
    return Delivery("events.d.x", b"{}", headers, "EVENTS", seq, NOW, 1, SettlingMsg(seq, settled))  # type: ignore[arg-type]


async def test_tracing_off_an_item_carries_its_messages_traceparent_unchanged() -> None:
    tracing.install(None)
    seen: list[str | None] = []

    async def handle(items: list[Item[int]]) -> None:
        seen.extend(i.traceparent for i in items)

    consumer = runtime(AckPolicy.ALL, handle)
    batch = [carrying([], 1, CLIENT_PARENT), carrying([], 2, None)]
    assert await consumer._process(batch, asyncio.Event())
    assert seen == [CLIENT_PARENT, None]


async def test_tracing_on_each_message_has_a_span_in_its_trace_ended_once_settled(
    spans: InMemorySpanExporter,
) -> None:
    settled: list[tuple[str, int]] = []
    onward: list[str | None] = []

    async def handle(items: list[Item[int]]) -> dict[int, Verdict]:
        onward.extend(i.traceparent for i in items)
        await consumer.settle(1)
        assert [seq_of(s) for s in spans.get_finished_spans()] == [1]
        return {2: Nak(1.0)}

    consumer = runtime(AckPolicy.EXPLICIT, handle)
    batch = [carrying(settled, 1, CLIENT_PARENT), carrying(settled, 2, None)]
    assert await consumer._process(batch, asyncio.Event())

    first, second = sorted(
        spans.get_finished_spans(),
        key=seq_of,
    )
    assert first.kind == SpanKind.CONSUMER and first.status.status_code == StatusCode.UNSET
    assert format(first.context.trace_id, "032x") == CLIENT_TRACE  # type: ignore[union-attr]
    assert first.parent is not None and format(first.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert second.parent is None  # no context came with it: a trace of its own
    assert second.status.status_code == StatusCode.ERROR  # nak'ed
    # What the worker publishes for each message is a child of its span.
    assert [tp.split("-")[1:3] for tp in onward if tp] == [
        [format(s.context.trace_id, "032x"), format(s.context.span_id, "016x")]  # type: ignore[union-attr]
        for s in (first, second)
    ]


async def test_tracing_on_a_retried_batch_ends_its_spans_as_errors(
    spans: InMemorySpanExporter,
) -> None:
    calls = 0

    async def handle(items: list[Item[int]]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise Retry("the database is away")

    consumer = runtime(AckPolicy.ALL, handle)
    with_backoff = consumer._pause

    async def no_wait(delay: float, batch: Any, stop: asyncio.Event) -> bool:
        return await with_backoff(0.0, batch, stop)

    consumer._pause = no_wait  # type: ignore[method-assign]
    assert await consumer._process(batch_of([], 1, 2), asyncio.Event())
    finished = spans.get_finished_spans()
    assert len(finished) == 2
    assert all(s.status.status_code == StatusCode.ERROR for s in finished)
    assert all(any(e.name == "retry" for e in s.events) for s in finished)
