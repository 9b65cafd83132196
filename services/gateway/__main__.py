"""`python -m services.gateway`: the HTTP gateway under uvicorn."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from types import FrameType

import uvicorn
from litestar import Litestar

from libs import logs, runtime
from libs import settings as settings_mod
from services.gateway.app import create_app
from services.gateway.resources import Shutdown

log = logging.getLogger("services.gateway")

# Open responses (SSE followers) get this long to finish once a stop is requested.
GRACEFUL_SHUTDOWN_S = 5


class GatewayServer(uvicorn.Server):
    """uvicorn, telling the app that a stop was asked for before it waits on open responses."""

    def __init__(self, config: uvicorn.Config, app: Litestar) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        shutdown: Shutdown = self._app.state.shutdown
        # A signal handler runs between two steps of the loop: hand the work to the loop.
        asyncio.get_running_loop().call_soon_threadsafe(shutdown.request)


def main() -> None:
    try:
        settings = settings_mod.load()
    except settings_mod.SettingsError as exc:
        print(f"smarthome gateway: {exc}", file=sys.stderr)
        sys.exit(2)
    logs.setup("gateway", settings.log_level)
    app = create_app(settings)
    runtime.freeze_startup_objects()
    runtime.give_back_large_blocks()
    config = uvicorn.Config(
        app,
        host=settings.http_host,
        port=settings.http_port,
        lifespan="on",
        log_config=None,  # libs.logs configured logging already
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        # X-Forwarded-For is believed only from SMARTHOME_TRUSTED_PROXIES (none by default:
        # uvicorn would otherwise trust 127.0.0.1), so limits count the real clients.
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=list(settings.trusted_proxies) or [],
    )
    server = GatewayServer(config, app)
    # uvicorn stops gracefully on SIGINT/SIGTERM (the lifespan drains NATS), then raises the
    # signal again against the handlers it found: these make that a clean exit 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        server.run()
    except SystemExit:
        # uvicorn exits 3 when the start fails; a stop asked for during the start is no failure.
        if not app.state.shutdown.requested:
            raise
    log.info("gateway stopped")


if __name__ == "__main__":
    main()
