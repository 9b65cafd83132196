"""`libs.pull.Puller` against a real server: one open pull request that hands out each message
as it is stored."""

from __future__ import annotations

import asyncio
import time
from functools import partial

from nats.js.api import AckPolicy, ConsumerConfig

from libs.pull import Puller
from tests.consumers import scratch_stream
from tests.helpers import eventually


async def test_a_message_is_handed_out_as_it_is_stored_not_when_the_batch_fills(nc, js) -> None:  # type: ignore[no-untyped-def]
    async with scratch_stream(js, "pull") as (stream, prefix):
        await js.add_consumer(
            stream, ConsumerConfig(durable_name="d", ack_policy=AckPolicy.ALL, max_ack_pending=256)
        )
        puller = Puller(nc, stream, "d")
        await puller.start()
        try:
            pulling = asyncio.create_task(puller.fetch(256, timeout=10))
            # The pull request waits on the server before the message is stored.
            await eventually(partial(_waiting, js, stream))  # type: ignore[arg-type]
            started = time.monotonic()
            await js.publish(f"{prefix}.one", b"1")
            msgs = await pulling
            waited = time.monotonic() - started
            await js.publish(f"{prefix}.two", b"2")
            more = await puller.fetch(255, timeout=10)  # the same request delivers it
        finally:
            await puller.stop()
    assert [msg.data for msg, _ in msgs] == [b"1"]
    assert waited < 2  # not the 10 s a pull waiting for a full batch would take
    assert [msg.data for msg, _ in more] == [b"2"]


async def _waiting(js, stream: str) -> bool:  # type: ignore[no-untyped-def]
    return (await js.consumer_info(stream, "d")).num_waiting > 0  # type: ignore[no-any-return]
