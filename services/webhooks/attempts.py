"""What one delivery attempt leaves behind (pure): the delivery's new record, and for a failure
still inside the retry window, when to try again."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from libs import webhooks
from services.webhooks.sender import Outcome


@dataclass(frozen=True)
class Previous:
    """What the delivery record says about the attempts before this one."""

    attempts: int
    first_attempt_at: datetime


@dataclass(frozen=True)
class Attempted:
    status: str  # delivered | pending (retried after `retry_in_s`) | failed
    attempts: int
    first_attempt_at: datetime
    at: datetime
    status_code: int | None
    error: str | None
    retry_in_s: float | None = None

    @property
    def next_attempt_at(self) -> datetime | None:
        return None if self.retry_in_s is None else self.at + timedelta(seconds=self.retry_in_s)


def after_attempt(
    previous: Previous | None,
    outcome: Outcome,
    at: datetime,
    policy: webhooks.RetryPolicy | None,
    rng: random.Random,
) -> Attempted:
    """The record after an attempt made `at`. Without a `policy` (a user's re-drive) a failure
    is final at once; with one it is retried until the window since the first attempt ends."""
    attempts = (previous.attempts if previous else 0) + 1
    first = previous.first_attempt_at if previous else at
    status, retry_in = webhooks.DELIVERED, None
    if not outcome.ok:
        if policy is not None:
            retry_in = webhooks.retry_delay(policy, attempts, first, at, rng)
        status = webhooks.FAILED if retry_in is None else webhooks.PENDING
    return Attempted(status, attempts, first, at, outcome.status_code, outcome.error, retry_in)
