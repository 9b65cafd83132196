"""Readiness: the gateway is ready when the bus is connected and the database answers."""

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


class Readiness(msgspec.Struct, frozen=True):
    status: str
    checks: dict[str, str]


class HealthService:
    def __init__(self, resources: Resources) -> None:
        self._resources = resources

    async def ready(self) -> Readiness:
        """The checks; Unavailable naming what is down when the bus or database is."""
        checks = {
            "bus": "ok" if self._resources.nc.is_connected else "unreachable",
            "database": await self._check(self._select_one()),
            # The cache is an accelerator (reads fall back to the database): reported only.
            "cache": await self._check(self._resources.cache.ping()),
        }
        down = [name for name in ("bus", "database") if checks[name] != "ok"]
        if down:
            raise Unavailable(
                "not ready: " + "; ".join(f"the {name} is {checks[name]}" for name in down)
            )
        return Readiness(status="ready", checks=checks)

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
