"""Readiness: can the gateway do its job now? Its job that nothing else can do is ingest:
it is ready while the bus stores what it publishes (connected, JetStream answering, storage
not full). A database or cache outage leaves it ready, degraded: the body says what does
not work meanwhile (the registry's reads and writes answer 503)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

import msgspec
from sqlalchemy import text

from libs.errors import Unavailable
from services.gateway.resources import Resources

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 2.0


# What an outage of each dependency takes away, while the gateway stays ready.
DEGRADED = {
    "database": "the registry, rules, commands, history and audit answer 503",
    "cache": "device state is read from the database only",
}


class Readiness(msgspec.Struct, frozen=True):
    status: str  # `ready`, or `degraded` when something other than ingest does not work
    checks: dict[str, str]
    degraded: list[str] = []


class HealthService:
    def __init__(self, resources: Resources) -> None:
        self._resources = resources

    async def ready(self) -> Readiness:
        """The checks; Unavailable saying why when the bus does not store."""
        bus, database, cache = await asyncio.gather(
            self._bus(),
            self._check(self._select_one()),
            self._check(self._resources.cache.ping()),
        )
        if bus != "ok":
            raise Unavailable(f"not ready: the bus is {bus}; publishing events does not work")
        checks = {"bus": bus, "database": database, "cache": cache}
        degraded = [
            f"the {name} is {checks[name]}: {what}"
            for name, what in DEGRADED.items()
            if checks[name] != "ok"
        ]
        return Readiness("degraded" if degraded else "ready", checks, degraded)

    async def _bus(self) -> str:
        """`ok` while the bus stores: connected, JetStream answering, and not refusing for
        want of space (one small request, the account's usage)."""
        if not self._resources.nc.is_connected:
            return "unreachable"
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                usage = (await self._resources.js.account_info()).storage
        except TimeoutError:
            return "connected, but JetStream is not answering"
        except Exception as exc:
            log.warning("readiness check failed: %s", exc)
            return f"connected, but JetStream is unavailable ({type(exc).__name__})"
        if self._resources.bus_storage.full(usage):
            return "full (its storage limit is reached: publishes answer 507)"
        return "ok"

    async def _select_one(self) -> object:
        async with self._resources.engine.connect() as connection:
            return await connection.scalar(text("SELECT 1"))

    async def _check(self, probe: Awaitable[object]) -> str:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                await probe
            return "ok"
        except TimeoutError:
            return "not answering"
        except Exception as exc:
            log.warning("readiness check failed: %s", exc)
            return f"unreachable ({type(exc).__name__})"
