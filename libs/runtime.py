"""How every worker process starts and stops: settings, logs, signals, health, drain."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from nats.aio.client import Client as NATS
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from libs import health, logs
from libs import settings as settings_mod
from libs.settings import Settings

log = logging.getLogger(__name__)


def run(
    service: str,
    main: Callable[[Settings, asyncio.Event], Awaitable[None]],
) -> None:
    """Run `main(settings, stop)` until SIGINT/SIGTERM sets `stop`; exit 0 on a clean stop."""
    try:
        settings = settings_mod.load()
    except settings_mod.SettingsError as exc:
        sys.exit(f"smarthome {service}: {exc}")
    logs.setup(service, settings.log_level)
    freeze_startup_objects()

    async def supervise() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(settings, stop)

    with contextlib.suppress(KeyboardInterrupt):
        run_loop(supervise())
    log.info("%s stopped", service)


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """On uvloop where it is installed (it comes with uvicorn[standard], as the gateway
    runs): its sockets and timers cost less per message than asyncio's own loop."""
    try:
        import uvloop
    except ImportError:  # e.g. on Windows
        asyncio.run(main)
    else:
        uvloop.run(main)


def freeze_startup_objects() -> None:
    """Move what importing made (modules, classes: tens of thousands of objects that live as
    long as the process) out of the collector's reach, so that a full collection while
    events flow walks only what the work made: shorter pauses, lower tail latency."""
    gc.collect()
    gc.freeze()


async def serve_health(settings: Settings, ready: health.ReadyCheck) -> asyncio.Server | None:
    """Start the probe endpoint when SMARTHOME_HEALTH_PORT is set (Kubernetes sets it)."""
    if not settings.health_port:
        return None
    server = await health.serve(settings.http_host, settings.health_port, ready)
    log.info("health on %s:%s", settings.http_host, settings.health_port)
    return server


READY_CHECK_TIMEOUT_S = 2.0


def bus_and_database(nc: NATS, engine: AsyncEngine) -> health.ReadyCheck:
    """A worker's readiness: it can make progress, which takes the bus and the database.
    (Not the cache: the actors go on without it.)"""

    async def ready() -> str | None:
        if not nc.is_connected:
            return "the bus is unreachable"
        try:
            async with asyncio.timeout(READY_CHECK_TIMEOUT_S), engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
        except Exception as exc:
            return f"the database is unreachable ({type(exc).__name__})"
        return None

    return ready


async def retry_until_stopped(
    attempt: Callable[[], Awaitable[None]],
    stop: asyncio.Event,
    what: str,
    on_failure: Callable[[], Awaitable[None]] | None = None,
    final: Callable[[Exception], bool] = lambda _exc: False,
) -> bool:
    """Run `attempt` until it succeeds (True) or `stop` is set (False), backing off 0.5-5 s.

    For work that must not be dropped while a dependency (bus, database) is down: the
    caller keeps its batch, `on_failure` can tell the bus it is still being worked on. An
    error that `final` says is final is raised at once: retrying would not change it (the
    database refused the data itself).
    """
    delay = 0.5
    while True:
        try:
            await attempt()
            return True
        except Exception as exc:  # the dependency is down or restarting: transient
            if final(exc):
                raise
            log.warning("%s failed, retrying in %.1fs: %r", what, delay, exc)
            if on_failure is not None:
                await on_failure()
            try:
                await asyncio.wait_for(stop.wait(), delay)
                return False
            except TimeoutError:
                delay = min(delay * 2, 5.0)
