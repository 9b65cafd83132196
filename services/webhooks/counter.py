"""A subscription's delivered events, counted in memory and written to its row about once a
second: the success path of a delivery touches no database."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime

from libs import messages as m
from services.webhooks.store import DeliveryStore

log = logging.getLogger(__name__)


class DeliveredCounter:
    """A subscription's delivered events, written to its row about once a second."""

    def __init__(self, store: DeliveryStore, subscription_id: str) -> None:
        self._store = store
        self._id = subscription_id
        self._count = 0
        self._at: datetime | None = None

    def add(self, events: int) -> None:
        self._count += events
        self._at = m.now()

    async def run(self, stop: asyncio.Event, every_s: float = 1.0) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)
            await self.flush()

    async def flush(self) -> None:
        if not self._count or self._at is None:
            return
        count, at = self._count, self._at
        try:
            await self._store.count_delivered(self._id, count, at)
        except Exception as exc:  # the database is down: kept, written with the next flush
            log.warning("subscription %s: delivered counter not written: %s", self._id, exc)
            return
        self._count -= count
