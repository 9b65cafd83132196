"""The consumer runtime's linger: at a trickle, the messages that arrive within the linger
after a batch's first come in that batch (the recorder's transaction per batch, not per
message); a batch that fills up is handed over at once, linger or not."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from libs.consumer import Consumer, Item
from tests.consumers import decode, running, scratch_stream
from tests.helpers import eventually, unique_id


@pytest.fixture
async def stream(js) -> AsyncIterator[tuple[str, str]]:  # type: ignore[no-untyped-def]
    async with scratch_stream(js, "TESTL") as made:
        yield made


def config() -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=unique_id("linger"),
        ack_policy=AckPolicy.ALL,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=30.0,
        max_ack_pending=1000,
    )


async def test_a_trickle_within_the_linger_is_handled_as_one_batch(nc, js, stream) -> None:  # type: ignore[no-untyped-def]
    name, prefix = stream
    batches: list[list[int]] = []

    async def handle(items: list[Item[Any]]) -> None:
        batches.append([item.value["n"] for item in items])

    consumer = Consumer(nc, name, config(), decode, handle, batch=100, linger=2.0, create=True)
    async with running(consumer):
        for n in range(10):  # one every 20 ms: without the linger, a batch each
            await js.publish(f"{prefix}.x", json.dumps({"n": n}).encode())
            await asyncio.sleep(0.02)
        await eventually(lambda: sum(map(len, batches)) == 10, timeout=10)
    assert [n for batch in batches for n in batch] == list(range(10))
    assert len(batches) <= 2, batches  # the publisher may stall past the linger, once


async def test_a_full_batch_does_not_wait_out_the_linger(nc, js, stream) -> None:  # type: ignore[no-untyped-def]
    name, prefix = stream
    batches: list[list[int]] = []

    async def handle(items: list[Item[Any]]) -> None:
        batches.append([item.value["n"] for item in items])

    for n in range(10):
        await js.publish(f"{prefix}.x", json.dumps({"n": n}).encode())
    consumer = Consumer(nc, name, config(), decode, handle, batch=5, linger=30.0, create=True)
    async with running(consumer):  # within 10 s: not after a linger of 30
        await eventually(lambda: sum(map(len, batches)) == 10, timeout=10)
    assert batches == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
