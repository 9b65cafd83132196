"""How every worker process starts and stops: settings, logs, signals, health, drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable

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

    async def supervise() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(settings, stop)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(supervise())
    log.info("%s stopped", service)


async def serve_health(settings: Settings, ready: health.ReadyCheck) -> asyncio.Server | None:
    """Start the probe endpoint when SMARTHOME_HEALTH_PORT is set (Kubernetes sets it)."""
    if not settings.health_port:
        return None
    server = await health.serve(settings.http_host, settings.health_port, ready)
    log.info("health on %s:%s", settings.http_host, settings.health_port)
    return server
