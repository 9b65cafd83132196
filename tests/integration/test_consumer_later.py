"""Settling later (`Later`, AckPolicy.ALL) against a real server: the next batch is handed
out while a deferred one waits, deferred batches are acked strictly in order (one ack for a
run of them), a batch answered at once queues behind a deferred one, a failed outcome leaves
it and what follows it to the next reader and ends the run, and a stop waits a little for
what is deferred; and a batch answered at once is not acked ahead of a deferred one it
follows, after that one failed or while its dead letter is sent."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RawStreamMsg
from nats.js.errors import NotFoundError

from libs import bus, subjects
from libs.consumer import Consumer, Dead, Handler, Item, Later, Verdicts
from tests.consumers import decode, running, scratch_stream
from tests.helpers import eventually

T = TypeVar("T")
DURABLE = "later"
# How long a "does not happen" is watched for: an early ack would be sent within a few
# milliseconds of the outcome that must not cause it (a dead letter first: one round trip).
QUIET_S = 0.3
ACKS = (b"", Msg.Ack.Ack)  # nats-py acks with an empty payload; "+ACK" says the same


@pytest.fixture
async def stream(js: JetStreamContext) -> AsyncIterator[tuple[str, str]]:
    async with scratch_stream(js, "TESTLATER") as made:
        yield made


@dataclass
class Deciding:
    """A handler that decides each batch at once and answers `Later`, its outcome a future
    the test ends (by the batch's first stream sequence). A message whose payload has "now"
    is answered at once instead: dead-lettered with that reason, or done (null)."""

    batches: list[list[int]] = field(default_factory=list)
    outcomes: dict[int, asyncio.Future[Verdicts]] = field(default_factory=dict)

    async def handle(self, items: list[Item[dict[str, Any]]]) -> Verdicts | Later:
        seqs = [item.delivery.seq for item in items]
        self.batches.append(seqs)
        first = items[0]
        if "now" in first.value:
            reason = first.value["now"]
            return {first.delivery.seq: Dead(reason)} if reason else None
        outcome: asyncio.Future[Verdicts] = asyncio.get_running_loop().create_future()
        self.outcomes[seqs[0]] = outcome
        return Later(outcome)


def consumer_of(
    nc: NATS, stream: str, prefix: str, handle: Handler[dict[str, Any]]
) -> Consumer[dict[str, Any]]:
    """A batch per message (each its own outcome), and a short fetch wait: a stop shows soon."""
    config = ConsumerConfig(
        durable_name=DURABLE,
        filter_subject=f"{prefix}.>",
        ack_policy=AckPolicy.ALL,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=30.0,  # longer than a test: nothing is redelivered behind its back
    )
    return Consumer(nc, stream, config, decode, handle, batch=1, wait=0.2, create=True)


async def publish(js: JetStreamContext, subject: str, payload: dict[str, Any]) -> int:
    return (await js.publish(subject, json.dumps(payload).encode())).seq


@contextlib.asynccontextmanager
async def acks_sent(nc: NATS, stream: str) -> AsyncIterator[list[int]]:
    """The stream sequences the consumer sends an ack for, as the bus passes them on.
    The runtime's own connection is this one: its acks come back here in the order sent."""
    acked: list[int] = []

    async def note(msg: Msg) -> None:
        if msg.data in ACKS:
            # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ns>.<pending>
            acked.append(int(msg.subject.split(".")[5]))

    sub = await nc.subscribe(f"$JS.ACK.{stream}.{DURABLE}.*.*.*.*.*", cb=note)
    try:
        yield acked
    finally:
        await sub.unsubscribe()


async def ack_floor(js: JetStreamContext, stream: str) -> int:
    info = await js.consumer_info(stream, DURABLE)
    return int(info.ack_floor.stream_seq or 0) if info.ack_floor else 0


async def acked_up_to(js: JetStreamContext, stream: str, seq: int) -> bool:
    info = await js.consumer_info(stream, DURABLE)
    return bool(info.ack_floor.stream_seq == seq and not info.num_ack_pending)


async def dead_letter(js: JetStreamContext, subject: str) -> RawStreamMsg | None:
    with contextlib.suppress(NotFoundError):
        return await js.get_last_msg(subjects.DEADLETTER_STREAM, subjects.deadletter(subject))
    return None


async def nothing_settled(
    js: JetStreamContext, stream: str, floor: int, acked: list[int], dead_subject: str
) -> bool:
    """No ack sent, the ack floor still at `floor`, no dead letter of `dead_subject` yet."""
    held = await ack_floor(js, stream) <= floor and not acked
    return held and await dead_letter(js, dead_subject) is None


async def until(check: Callable[[], Awaitable[T]], timeout: float = 5.0) -> T:
    """`eventually` for an async check (typed: mypy infers nothing through its union)."""
    either: Callable[[], Awaitable[T] | T] = check
    return await eventually(either, timeout)


async def stays(check: Callable[[], Awaitable[bool] | bool], for_s: float = QUIET_S) -> None:
    """`check` holds throughout `for_s`: for what must not happen (an early ack), which no
    condition can be waited on for."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + for_s
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        assert result
        if loop.time() >= deadline:
            return
        await asyncio.sleep(0.05)


async def test_deferred_batches_are_settled_in_order_and_the_next_is_not_held_up(
    nc: NATS, js: JetStreamContext, stream: tuple[str, str]
) -> None:
    name, prefix = stream
    worker = Deciding()
    async with acks_sent(nc, name) as acked, running(consumer_of(nc, name, prefix, worker.handle)):
        first = await publish(js, f"{prefix}.a", {"n": 1})
        await eventually(lambda: worker.batches == [[first]], timeout=5)
        second = await publish(js, f"{prefix}.b", {"n": 2})
        # Handed out while the first batch's outcome is still pending.
        await eventually(lambda: worker.batches == [[first], [second]], timeout=5)
        assert not worker.outcomes[first].done()

        # The second ends first: it waits for the first (its ack would cover it).
        worker.outcomes[second].set_result({second: Dead("refused on commit")})

        await stays(lambda: nothing_settled(js, name, first - 1, acked, f"{prefix}.b"))

        # The first ends: both are settled, by one ack (the second's), its dead letter first.
        worker.outcomes[first].set_result(None)
        await until(lambda: acked_up_to(js, name, second), timeout=5)
        dead = await until(lambda: dead_letter(js, f"{prefix}.b"), timeout=5)
        assert dead is not None and dead.headers is not None
        assert dead.headers[bus.DL_REASON] == "refused on commit"
        assert dead.headers[bus.DL_STREAM_SEQ] == str(second)
        assert await dead_letter(js, f"{prefix}.a") is None
        await eventually(lambda: acked == [second], timeout=5)
    assert acked == [second]
    assert worker.batches == [[first], [second]]


async def test_a_failed_outcome_leaves_its_batch_and_the_later_ones_to_the_next_reader(
    nc: NATS, js: JetStreamContext, stream: tuple[str, str]
) -> None:
    name, prefix = stream
    worker = Deciding()
    failing = consumer_of(nc, name, prefix, worker.handle)
    stop = asyncio.Event()  # never set: the failure ends the run
    async with acks_sent(nc, name) as acked:
        task = asyncio.create_task(failing.run(stop))
        try:
            await asyncio.wait_for(failing.bound.wait(), 5)
            first = await publish(js, f"{prefix}.a", {"n": 1})
            await eventually(lambda: worker.batches == [[first]], timeout=5)
            second = await publish(js, f"{prefix}.b", {"n": 2})
            await eventually(lambda: worker.batches == [[first], [second]], timeout=5)

            worker.outcomes[first].set_exception(RuntimeError("the commit failed"))
            await asyncio.wait_for(task, 5)  # ends by itself, without raising
        finally:
            if not task.done():
                stop.set()
                await asyncio.wait_for(task, 5)
        # What was decided after the failed batch rested on it: given up, not settled.
        assert worker.outcomes[second].cancelled()
        info = await js.consumer_info(name, DURABLE)
        assert info.ack_floor.stream_seq == first - 1
        assert info.num_ack_pending == 2
        assert acked == []

    # The next reader reads both back from the stream and handles each once, in order.
    handled: list[tuple[int, int]] = []

    async def handle(items: list[Item[dict[str, Any]]]) -> None:
        handled.extend((item.delivery.seq, item.delivery.delivered) for item in items)

    async with running(consumer_of(nc, name, prefix, handle)):
        await eventually(lambda: len(handled) >= 2, timeout=5)
    assert handled == [(first, 0), (second, 0)]  # 0: read from the stream, not redelivered


async def test_a_batch_answered_at_once_is_settled_behind_a_deferred_one(
    nc: NATS, js: JetStreamContext, stream: tuple[str, str]
) -> None:
    name, prefix = stream
    worker = Deciding()
    async with acks_sent(nc, name) as acked, running(consumer_of(nc, name, prefix, worker.handle)):
        first = await publish(js, f"{prefix}.a", {"n": 1})
        await eventually(lambda: worker.batches == [[first]], timeout=5)
        # Answered at once: dead-lettered, then done; neither settled before the first.
        second = await publish(js, f"{prefix}.b", {"now": "refused at once"})
        third = await publish(js, f"{prefix}.c", {"now": None})
        await eventually(lambda: worker.batches == [[first], [second], [third]], timeout=5)

        await stays(lambda: nothing_settled(js, name, first - 1, acked, f"{prefix}.b"))

        worker.outcomes[first].set_result(None)
        await until(lambda: acked_up_to(js, name, third), timeout=5)
        dead = await until(lambda: dead_letter(js, f"{prefix}.b"), timeout=5)
        assert dead is not None and dead.headers is not None
        assert dead.headers[bus.DL_REASON] == "refused at once"
        await eventually(lambda: acked == [third], timeout=5)
    assert acked == [third]  # one ack for the run of three


async def test_a_stop_waits_for_a_deferred_batch_that_ends_within_the_grace(
    nc: NATS, js: JetStreamContext, stream: tuple[str, str]
) -> None:
    name, prefix = stream
    worker = Deciding()
    consumer = consumer_of(nc, name, prefix, worker.handle)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        await asyncio.wait_for(consumer.bound.wait(), 5)
        first = await publish(js, f"{prefix}.a", {"n": 1})
        await eventually(lambda: worker.batches == [[first]], timeout=5)

        stop.set()

        # Longer than the fetch wait (0.2 s): without the grace the run would have ended.
        async def still_waiting() -> bool:
            return not task.done() and await ack_floor(js, name) < first

        await stays(still_waiting, 0.5)
        worker.outcomes[first].set_result(None)
        await asyncio.wait_for(task, 5)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    # The run has ended: nothing is sent for it any more, so the ack went before it ended.
    await until(lambda: acked_up_to(js, name, first), timeout=5)


async def test_a_stop_leaves_a_deferred_batch_that_does_not_end_within_the_grace(
    nc: NATS, js: JetStreamContext, stream: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("libs.consumer.SETTLE_GRACE_S", 0.5)
    name, prefix = stream
    worker = Deciding()
    consumer = consumer_of(nc, name, prefix, worker.handle)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    async with acks_sent(nc, name) as acked:
        task = asyncio.create_task(consumer.run(stop))
        try:
            await asyncio.wait_for(consumer.bound.wait(), 5)
            first = await publish(js, f"{prefix}.a", {"n": 1})
            await eventually(lambda: worker.batches == [[first]], timeout=5)
            stopped_at = loop.time()
            stop.set()
            await asyncio.wait_for(task, 5)
            took = loop.time() - stopped_at
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
        assert 0.5 <= took < 3.0  # the grace, then the fetch wait at most, and some slack
        assert worker.outcomes[first].cancelled()
        info = await js.consumer_info(name, DURABLE)
        assert info.ack_floor.stream_seq == first - 1
        assert info.num_ack_pending == 1
        await nc.flush()
        assert acked == []


async def test_a_batch_answered_at_once_after_a_deferred_one_failed_is_not_acked(
    nc: NATS, js: JetStreamContext, stream: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """The deferred batch fails while the next batch's handler still runs: that batch's
    answer (done, at once) must not be acked, as its ack would cover the failed batch."""
    name, prefix = stream
    worker = Deciding()
    answering = asyncio.Event()
    answer = asyncio.Event()

    async def handle(items: list[Item[dict[str, Any]]]) -> Verdicts | Later:
        if "now" in items[0].value:
            answering.set()
            await answer.wait()
        return await worker.handle(items)

    consumer = consumer_of(nc, name, prefix, handle)
    stop = asyncio.Event()  # never set: the failure ends the run
    async with acks_sent(nc, name) as acked:
        task = asyncio.create_task(consumer.run(stop))
        try:
            await asyncio.wait_for(consumer.bound.wait(), 5)
            first = await publish(js, f"{prefix}.a", {"n": 1})
            await eventually(lambda: worker.batches == [[first]], timeout=5)
            await publish(js, f"{prefix}.b", {"now": None})
            await asyncio.wait_for(answering.wait(), 5)

            worker.outcomes[first].set_exception(RuntimeError("the commit failed"))
            await eventually(
                lambda: any("a deferred batch failed" in r.getMessage() for r in caplog.records),
                timeout=5,
            )
            answer.set()
            await asyncio.wait_for(task, 5)
        finally:
            answer.set()
            stop.set()
            await asyncio.wait_for(task, 10)
        await nc.flush()
        assert acked == []
        assert await ack_floor(js, name) == first - 1


async def test_a_batch_answered_at_once_waits_for_a_deferred_ones_dead_letters(
    nc: NATS, js: JetStreamContext, stream: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deferred batch's outcome has ended and its dead letter is on its way (slow: the
    bus is busy) when the next batch is answered at once: that batch's ack, which covers
    the deferred one, must wait for the dead letter."""
    name, prefix = stream
    worker = Deciding()
    answering = asyncio.Event()
    answer = asyncio.Event()
    dead_lettering = asyncio.Event()
    dead_letter_may_go = asyncio.Event()
    dead_letter_now = bus.dead_letter

    async def dead_letter_slowly(*args: Any, **kwargs: Any) -> None:
        dead_lettering.set()
        await dead_letter_may_go.wait()
        await dead_letter_now(*args, **kwargs)

    monkeypatch.setattr(bus, "dead_letter", dead_letter_slowly)

    async def handle(items: list[Item[dict[str, Any]]]) -> Verdicts | Later:
        if "now" in items[0].value:
            answering.set()
            await answer.wait()
        return await worker.handle(items)

    async with acks_sent(nc, name) as acked, running(consumer_of(nc, name, prefix, handle)):
        first = await publish(js, f"{prefix}.a", {"n": 1})
        await eventually(lambda: worker.batches == [[first]], timeout=5)
        second = await publish(js, f"{prefix}.b", {"now": None})
        await asyncio.wait_for(answering.wait(), 5)

        worker.outcomes[first].set_result({first: Dead("refused on commit")})
        await asyncio.wait_for(dead_lettering.wait(), 5)
        answer.set()
        await stays(lambda: not acked)

        dead_letter_may_go.set()
        await until(lambda: acked_up_to(js, name, second), timeout=5)
        assert await dead_letter(js, f"{prefix}.a") is not None
