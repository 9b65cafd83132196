"""The device registry as the rules read it: one copy per process, shared by the engines of
the partitions it evaluates (a selector matches on kind, location and tags; an action may
command only an active, enabled device of the rule's home).

A registry fact changes one entry (the fact says what the device is now). The registry is
read from the database when the first partition starts, and again on the periodic catch-up
(facts come through core NATS: one lost in a reconnect is caught up then), at most once a
`max_age` however many partitions ask: registering a fleet costs one entry a device.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import weakref
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import messages as m
from libs import subjects
from libs.rule_logic import DeviceInfo
from services.rules import loading

log = logging.getLogger(__name__)

# The shared copy of each connection's process (the engines are built with the connection).
_SHARED: weakref.WeakKeyDictionary[NATS, Registry] = weakref.WeakKeyDictionary()


class Registry:
    def __init__(self, nc: NATS, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._nc = nc
        self._sessions = sessions
        self.devices: dict[str, DeviceInfo] = {}  # the same mapping for as long as it lives
        self._users = 0
        self._sub: Subscription | None = None
        self._read_at: float | None = None  # monotonic; None: not read since attached
        self._reading = asyncio.Lock()
        # Registry facts that came while the registry was being read: applied to what is read.
        self._arrived: list[m.RegistryFact] | None = None

    @classmethod
    def shared(cls, nc: NATS, sessions: async_sessionmaker[AsyncSession]) -> Registry:
        """The one copy of the process that holds `nc`."""
        found = _SHARED.get(nc)
        if found is None:
            found = _SHARED[nc] = cls(nc, sessions)
        return found

    async def attach(self) -> Callable[[], Awaitable[None]]:
        """Follow registry facts (the first user subscribes) and have the registry read;
        returns the detach: the last user's unsubscribes."""
        self._users += 1
        try:
            if self._sub is None:
                self._sub = await self._nc.subscribe(
                    subjects.DEVICE_REGISTRY_ALL, cb=self._on_registry
                )
                self._read_at = None  # not followed until now: read it again
            await self.refresh(math.inf)  # read once while followed
        except BaseException:
            await self._detach()
            raise
        return self._detach

    async def _detach(self) -> None:
        self._users -= 1
        if self._users == 0 and self._sub is not None:
            sub, self._sub = self._sub, None
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def refresh(self, max_age: float) -> None:
        """Read the whole registry again unless it was read less than `max_age` s ago."""
        async with self._reading:
            read_at = self._read_at
            if read_at is not None and time.monotonic() - read_at < max_age:
                return
            started = time.monotonic()
            self._arrived = []
            try:
                read = await loading.load_registry(self._sessions)
            finally:
                arrived, self._arrived = self._arrived, None
            for fact in arrived:
                loading.apply_registry_fact(read, fact)
            self.devices.clear()  # the same mapping: the engines' worlds and actions read it
            self.devices.update(read)
            self._read_at = started

    async def _on_registry(self, msg: Msg) -> None:
        """A registry change costs one entry: the fact says what the device is now."""
        try:
            fact = m.registry_fact_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("%s: unreadable registry fact: %s", msg.subject, exc)
            return
        loading.apply_registry_fact(self.devices, fact)
        if self._arrived is not None:
            self._arrived.append(fact)
