"""What the engine's decisions do on the outside (commands, traces, episode writes), run in
order per key (a rule and a device) and concurrently across keys.

The engine decides synchronously (episodes change in memory at once, so the next fact sees
them); the effects follow. A slow database or bus then holds back only the key it concerns
and the ack of the facts that caused it, not the evaluation of other facts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial

Effect = Callable[[], Awaitable[None]]


class Effects:
    def __init__(self) -> None:
        self._last: dict[str, asyncio.Task[None]] = {}
        self._new: list[asyncio.Task[None]] = []

    def submit(self, key: str, effect: Effect) -> None:
        """Run `effect` after the effects submitted before it for the same key."""
        task = asyncio.create_task(_after(self._last.get(key), effect))
        self._last[key] = task
        task.add_done_callback(partial(self._forget, key))
        self._new.append(task)

    def take(self) -> list[asyncio.Task[None]]:
        """The effects submitted since the last call: what a batch waits for before its ack."""
        new, self._new = self._new, []
        return new

    def cancel(self) -> None:
        """The engine stops: effects not done are dropped; their causes were not acked."""
        for task in self._new + list(self._last.values()):
            task.cancel()
        self._new = []

    def _forget(self, key: str, task: asyncio.Task[None]) -> None:
        if self._last.get(key) is task:
            del self._last[key]


async def _after(previous: asyncio.Task[None] | None, effect: Effect) -> None:
    if previous is not None:
        await previous  # a failure there stops this key: its facts will be replayed
    await effect()
