"""When each simulated device reports: every `interval` seconds at its own phase, on an
absolute schedule, for the whole fleet at once (one heap, not a task and a timer per device:
at 10,000 devices those cost more than the readings).

A slow publish delays one reading, not every later one: waiting `interval` after each publish
let a busy bus move many devices' phases together, and the fleet's load came in bursts.
"""

from __future__ import annotations

import heapq
import math
import random


def next_due(due: float, now: float, interval: float) -> float:
    """The reading after the one due at `due`, on the device's own phase; one later than
    `interval` skips those it missed (no burst to catch up)."""
    due += interval
    if due < now:
        due += interval * math.ceil((now - due) / interval)
    return due


class Schedule:
    """The next reading of each of `count` devices (by index), each at a random phase."""

    def __init__(self, count: int, interval: float, now: float, rng: random.Random) -> None:
        self.interval = interval
        self._due = [(now + rng.uniform(0, interval), i) for i in range(count)]
        heapq.heapify(self._due)
        self._last = [now] * count  # when each device last reported (or the start)

    def next_at(self) -> float | None:
        return self._due[0][0] if self._due else None

    def take_due(self, now: float) -> list[tuple[int, float]]:
        """The devices due by `now`, each with the seconds since its last reading, in the
        order they were due; each is scheduled for its next reading."""
        taken = []
        while self._due and self._due[0][0] <= now:
            due, i = self._due[0]
            taken.append((i, now - self._last[i]))
            self._last[i] = now
            heapq.heapreplace(self._due, (next_due(due, now, self.interval), i))
        return taken
