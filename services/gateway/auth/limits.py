"""Failed sign-ins per user name: five a minute, then 429 until the oldest one ages out.

Per process, like Litestar's in-memory rate limit store; each gateway replica counts its own
(an attacker spread over N replicas gets 5·N tries a minute, still far from a brute force).
"""

from __future__ import annotations

import math
import time
from collections import deque

from litestar.exceptions import TooManyRequestsException

WINDOW_S = 60.0
MAX_FAILURES = 5
MAX_TRACKED = 10_000  # names tried; the oldest are forgotten first


class LoginFailures:
    def __init__(self) -> None:
        self._failures: dict[str, deque[float]] = {}

    def check(self, username: str) -> None:
        """Raise 429 (with Retry-After) while this name has had its failures for the minute."""
        recent = self._recent(username)
        if len(recent) >= MAX_FAILURES:
            wait = max(1, math.ceil(recent[0] + WINDOW_S - time.monotonic()))
            raise TooManyRequestsException(
                detail=f"too many failed sign-ins for {username!r}; try again in {wait} s",
                headers={"Retry-After": str(wait)},
            )

    def failed(self, username: str) -> None:
        self._recent(username).append(time.monotonic())
        if len(self._failures) > MAX_TRACKED:
            self._failures.pop(next(iter(self._failures)))

    def succeeded(self, username: str) -> None:
        self._failures.pop(username.lower(), None)

    def _recent(self, username: str) -> deque[float]:
        recent = self._failures.setdefault(username.lower(), deque())
        horizon = time.monotonic() - WINDOW_S
        while recent and recent[0] < horizon:
            recent.popleft()
        return recent
