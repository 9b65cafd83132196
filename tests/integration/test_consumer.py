"""The consumer runtime against a real server: deliveries lost with a connection handled once,
an undecodable message dead-lettered with its reason, a dependency down backed off (AckPolicy
.ALL: the batch kept; EXPLICIT: nak'ed and redelivered), and its metrics; a long handler kept
in progress; reply subjects read as nats-py reads them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from prometheus_client import REGISTRY

from libs import bus, subjects
from libs.consumer import Consumer, Item, Retry
from libs.errors import Unavailable
from libs.pull import Puller, Reply
from tests.consumers import decode, running, scratch_stream
from tests.helpers import eventually
from tests.proxy import Relay


@dataclass
class Worker:
    handled: list[int] = field(default_factory=list)
    failures: int = 0  # the next calls that find the dependency down
    failure: type[Exception] = Retry
    calls: int = 0

    async def handle(self, items: list[Item[dict[str, Any]]]) -> None:
        self.calls += 1
        if self.failures:
            self.failures -= 1
            raise self.failure("the database is down")
        self.handled += [item.delivery.seq for item in items]


@pytest.fixture
async def stream(js) -> AsyncIterator[tuple[str, str]]:  # type: ignore[no-untyped-def]
    async with scratch_stream(js, "TESTC") as made:
        yield made


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def publish_n(js, subject: str, n: int) -> int:  # type: ignore[no-untyped-def]
    seq = 0
    for i in range(n):
        seq = (await js.publish(subject, json.dumps({"n": i}).encode())).seq
    return seq


async def test_ack_all_lost_deliveries_dead_letters_and_retries(
    js, nats_url, bus_passwords, stream
) -> None:  # type: ignore[no-untyped-def]
    name, prefix = stream
    relay = Relay(int(nats_url.rsplit(":", 1)[1]))
    nc = await bus.connect(
        relay.url, "consumer-test", "operator", bus_passwords["operator"].password
    )
    config = ConsumerConfig(
        durable_name="c",
        filter_subject=f"{prefix}.>",
        ack_policy=AckPolicy.ALL,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=30.0,  # longer than the test: a lost delivery is not simply redelivered
        max_ack_pending=100,
    )
    worker = Worker()
    consumer = Consumer(nc, name, config, decode, worker.handle, create=True, pending_every=0.1)
    labels = {"stream": name, "consumer": "c"}
    subject = f"{prefix}.a"

    def handled(n: int) -> Callable[[], bool]:
        return lambda: len(worker.handled) >= n

    try:
        async with running(consumer):
            await publish_n(js, subject, 3)
            await eventually(handled(3))

            # Handed out on a connection that dies before they arrive.
            relay.drop()
            last = await publish_n(js, subject, 3)
            await eventually(lambda: _delivered(js, name, last))
            relay.cut()
            await publish_n(js, subject, 2)
            await eventually(handled(8), timeout=15)
            # Each once, in order. The 3 handed out on the dead connection were recovered; a
            # busy machine may hand out one of the next 2 on it as well, before the cut shows.
            assert worker.handled == list(range(1, 9))
            assert 3 <= metric("smarthome_consumer_recovered_total", **labels) <= 5

            # Undecodable: dead-lettered with the reason, and the consumer goes on.
            bad = (await js.publish(f"{prefix}.bad", b"not json")).seq
            dead = await eventually(lambda: _last(js, subjects.deadletter(f"{prefix}.bad")))
            assert dead.headers[bus.DL_REASON].startswith("not JSON: ")  # the decoder's words
            assert dead.headers[bus.DL_STREAM_SEQ] == str(bad)
            # Counted once the publish is acked, which the test may see first.
            await eventually(
                lambda: metric("smarthome_deadletters_total", stream=name, reason="undecodable")
            )
            assert metric("smarthome_deadletters_total", stream=name, reason="undecodable") == 1

            # The dependency is down twice: the batch is kept and handled once it is back.
            worker.failures = 2
            calls = worker.calls
            await publish_n(js, subject, 1)
            await eventually(handled(9), timeout=15)
            assert worker.calls == calls + 3

            assert await eventually(lambda: _acked_up_to(js, name, "c", bad + 1))
            # All 10 came in, each either delivered or read back from the stream.
            delivered = metric("smarthome_consumer_delivered_total", **labels)
            assert delivered + metric("smarthome_consumer_recovered_total", **labels) >= 10
            assert metric("smarthome_consumer_acked_total", **labels) >= 10
            assert metric("smarthome_consumer_handle_seconds_count", **labels) >= 4
            await eventually(
                lambda: (
                    REGISTRY.get_sample_value("smarthome_consumer_pending_messages", labels) == 0
                )
            )
    finally:
        await nc.drain()
        relay.close()
    # Each exactly once, in stream order: the lost ones read from the stream, not redelivered.
    assert worker.handled == sorted(set(worker.handled)) and len(worker.handled) == 9
    assert bad not in worker.handled


async def test_explicit_a_dependency_down_naks_and_the_bus_redelivers(nc, js, stream) -> None:  # type: ignore[no-untyped-def]
    name, prefix = stream
    config = ConsumerConfig(
        durable_name="e",
        filter_subject=f"{prefix}.>",
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=30.0,
    )
    worker = Worker(failures=1, failure=Unavailable)
    consumer = Consumer(nc, name, config, decode, worker.handle, create=True)
    labels = {"stream": name, "consumer": "e"}
    async with running(consumer):
        seq = await publish_n(js, f"{prefix}.x", 1)
        await eventually(lambda: worker.handled == [seq], timeout=10)
        await eventually(lambda: _acked_up_to(js, name, "e", seq))
    assert worker.calls == 2
    assert metric("smarthome_consumer_redelivered_total", **labels) == 1
    assert metric("smarthome_consumer_delivered_total", **labels) == 2


async def _delivered(js, stream: str, last_seq: int) -> bool:  # type: ignore[no-untyped-def]
    info = await js.consumer_info(stream, "c")
    return bool(info.delivered.stream_seq >= last_seq)


async def _acked_up_to(js, stream: str, durable: str, seq: int) -> bool:  # type: ignore[no-untyped-def]
    info = await js.consumer_info(stream, durable)
    return bool(info.ack_floor.stream_seq >= seq and not info.num_ack_pending)


async def _last(js, subject: str):  # type: ignore[no-untyped-def]
    with contextlib.suppress(NotFoundError):
        return await js.get_last_msg(subjects.DEADLETTER_STREAM, subject)
    return None


async def test_a_prefix_the_handler_settled_is_not_handled_again_after_a_restart(  # type: ignore[no-untyped-def]
    nc, js, stream
) -> None:
    """A handler that waits long in the middle of its batch (a webhook's retry back-off)
    settles what it finished first: a restart during the wait starts after it."""
    name, prefix = stream
    config = ConsumerConfig(
        durable_name="s",
        filter_subject=f"{prefix}.>",
        ack_policy=AckPolicy.ALL,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=30.0,
    )
    last = await publish_n(js, f"{prefix}.x", 4)
    first: list[int] = []
    waiting = asyncio.Event()

    async def finish_two_then_wait(items: list[Item[dict[str, Any]]]) -> None:
        first.extend(item.delivery.seq for item in items)
        await stopping.settle(items[1].delivery.seq)
        waiting.set()
        await asyncio.Event().wait()  # the back-off: ended by the stop below

    stopping = Consumer(nc, name, config, decode, finish_two_then_wait, create=True)
    stop = asyncio.Event()
    task = asyncio.create_task(stopping.run(stop))
    await asyncio.wait_for(waiting.wait(), 10)
    task.cancel()  # the dispatcher cancels a worker stuck in a delivery
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await eventually(lambda: _acked_up_to_floor(js, name, "s", last - 2))

    worker = Worker()
    async with running(Consumer(nc, name, config, decode, worker.handle)):
        await eventually(lambda: worker.handled == [last - 1, last], timeout=10)
    assert first == [last - 3, last - 2, last - 1, last]


async def test_a_missing_consumer_is_created_only_when_the_worker_says_so(  # type: ignore[no-untyped-def]
    nc, js, stream
) -> None:
    name, prefix = stream
    config = ConsumerConfig(
        durable_name="m", filter_subject=f"{prefix}.>", ack_policy=AckPolicy.ALL
    )
    asked: list[bool] = []

    async def may_create() -> bool:
        asked.append(True)
        return len(asked) > 1  # not the first time it is found missing

    worker = Worker()
    consumer = Consumer(nc, name, config, decode, worker.handle, create=may_create)
    async with running(consumer):
        seq = await publish_n(js, f"{prefix}.x", 1)
        await eventually(lambda: worker.handled == [seq], timeout=10)
    assert len(asked) == 2


async def _acked_up_to_floor(js, stream: str, durable: str, seq: int) -> bool:  # type: ignore[no-untyped-def]
    info = await js.consumer_info(stream, durable)
    return bool(info.ack_floor.stream_seq == seq)


async def test_a_handler_longer_than_ack_wait_is_kept_in_progress(nc, js, stream) -> None:  # type: ignore[no-untyped-def]
    name, prefix = stream
    config = ConsumerConfig(
        durable_name="k",
        filter_subject=f"{prefix}.>",
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=1.0,
    )
    calls: list[int] = []

    async def slow(items: list[Item[dict[str, Any]]]) -> None:
        calls.extend(item.delivery.seq for item in items)
        await asyncio.sleep(2.6)  # the work itself: over two ack waits

    consumer = Consumer(nc, name, config, decode, slow, create=True)
    async with running(consumer):
        seq = await publish_n(js, f"{prefix}.x", 1)
        await eventually(lambda: _acked_up_to(js, name, "k", seq), timeout=10)
    info = await js.consumer_info(name, "k")
    assert calls == [seq]
    assert info.delivered.consumer_seq == 1  # told it was in progress: never handed out again


async def test_reply_subjects_are_read_as_nats_py_reads_them(nc, js, stream) -> None:  # type: ignore[no-untyped-def]
    """`Reply.of` against real deliveries: a large pending count, and a redelivery."""
    name, prefix = stream
    many = 1_500
    for _ in range(many - 1):
        await nc.publish(f"{prefix}.x", b"{}")
    await js.publish(f"{prefix}.x", b"{}")  # stored after the others: one connection
    await js.add_consumer(
        name,
        ConsumerConfig(durable_name="r", ack_policy=AckPolicy.EXPLICIT, max_ack_pending=10),
    )
    puller = Puller(nc, name, "r")
    await puller.start()
    try:
        first = await puller.fetch(1, 5)
        await first[0][0].nak()  # handed out again, delivered twice
        got = [*first]
        while not any(reply.delivered > 1 for _, reply in got[1:]):
            got += await asyncio.wait_for(puller.fetch(10, 5), 10)
    finally:
        await puller.stop()
    for msg, reply in got:
        meta = msg.metadata
        assert reply == (
            meta.stream,
            meta.sequence.stream,
            meta.sequence.consumer,
            meta.num_delivered,
            reply.timestamp_ns,
            meta.num_pending,
        )
    assert got[0][1].pending == many - 1
    again = next(reply for _, reply in got[1:] if reply.delivered > 1)
    assert (again.stream_seq, again.delivered) == (got[0][1].stream_seq, 2)
    assert isinstance(again, Reply)


async def test_a_batch_s_delivery_age_is_how_long_its_oldest_message_waited(js, nc, stream) -> None:  # type: ignore[no-untyped-def]
    """`smarthome_consumer_delivery_age_seconds`: from the stream's storing of a batch's oldest
    message to its hand-out; here the consumer starts after the messages are stored, so each
    waited at least from its publish to the start, and at most until it was handled."""
    name, prefix = stream
    config = ConsumerConfig(
        durable_name="aged", filter_subject=f"{prefix}.>", ack_policy=AckPolicy.ALL
    )
    labels = {"stream": name, "consumer": "aged"}
    published = time.time()
    await publish_n(js, f"{prefix}.a", 3)
    stored_for = await _waited_since(time.time(), 0.2)  # each acked, so stored, before
    handled_at: list[float] = []

    async def handle(items: list[Item[dict[str, Any]]]) -> None:
        handled_at.append(time.time())

    consumer = Consumer(nc, name, config, decode, handle, create=True)
    async with running(consumer):
        await eventually(lambda: handled_at)
    batches = metric("smarthome_consumer_delivery_age_seconds_count", **labels)
    age = metric("smarthome_consumer_delivery_age_seconds_sum", **labels)
    assert batches == len(handled_at) >= 1
    assert stored_for <= age <= (handled_at[-1] - published) * batches


async def _waited_since(since: float, seconds: float) -> float:
    """Wait until `seconds` have passed since `since` (a condition with a deadline, not a
    sleep: the age under test is this wait); how long it was."""

    async def waited() -> float | None:
        passed = time.time() - since
        return passed if passed >= seconds else None

    return await eventually(waited)
