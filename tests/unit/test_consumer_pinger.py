"""The consumer's keep-alive pings (`libs.consumer._Pinger`), on uvloop: the services' loop."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest
import uvloop

from libs.consumer import _Pinger


@pytest.fixture
def no_collector() -> Iterator[None]:
    """Garbage in reference cycles is kept for the test to see, not collected by chance."""
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def test_a_batch_that_ends_before_its_first_ping_leaves_no_cycle(no_collector: None) -> None:
    # A cycle per batch (a closure that re-armed the timer with itself) kept each batch's
    # messages until the collector's next pass, and made its passes frequent: the soak's p99.
    pinged = 0

    async def ping() -> None:
        nonlocal pinged
        pinged += 1

    async def batches() -> None:
        for _ in range(100):
            pinger = _Pinger(asyncio.get_running_loop(), 30.0, ping)
            await asyncio.sleep(0)  # the batch's work
            await pinger.stop()

    uvloop.run(batches())
    gc.collect()
    assert pinged == 0
    assert [type(o).__name__ for o in gc.garbage] == []


def test_a_long_batch_is_pinged_every_period_until_stopped(no_collector: None) -> None:
    times: list[float] = []
    three = asyncio.Event()

    async def ping() -> None:
        times.append(asyncio.get_running_loop().time())
        if len(times) == 3:
            three.set()

    async def long_batch() -> float:
        loop = asyncio.get_running_loop()
        began = loop.time()
        pinger = _Pinger(asyncio.get_running_loop(), 0.05, ping)
        await asyncio.wait_for(three.wait(), 5.0)
        await pinger.stop()
        stopped = len(times)
        await asyncio.sleep(0.15)
        assert len(times) == stopped, "pinged after it was stopped"
        return began

    began = uvloop.run(long_batch())
    assert len(times) == 3
    # One period apart at least (uvloop's timers are whole milliseconds: within 2 ms).
    assert all(t - began >= 0.05 * (i + 1) - 0.002 for i, t in enumerate(times))
    gc.collect()
    assert [type(o).__name__ for o in gc.garbage] == []
