"""The clock of a partition: what runs every tick while it is evaluated (due episodes, the
readiness of its consumers)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

TICK_S = 0.2


async def every_tick(
    quit: asyncio.Event, work: Callable[[], Awaitable[None]], seconds: float = TICK_S
) -> None:
    """Run `work` now and then every `seconds` until `quit` is set; a failure of `work` ends
    the loop (the partition stops and is taken again, from what is stored)."""
    while not quit.is_set():
        await work()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(quit.wait(), seconds)
