"""What the gateway holds open while it runs: the database engine, NATS and the cache.

The lifespan opens them once and puts them on `app.state`; handlers receive them (or the
services built on them) by dependency injection. Nothing here lives in a module global.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from litestar.datastructures import State
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from libs import bus
from libs.cache import StateCache, make_cache
from libs.db.engine import make_engine, make_sessionmaker
from libs.errors import Unavailable
from libs.settings import Settings
from services.gateway.health.storage import BusStorage

log = logging.getLogger(__name__)


class StartupAborted(RuntimeError):
    """Asked to stop before the gateway could start."""


class Shutdown:
    """Told when the process is asked to stop, before the server waits for open responses:
    live streams end at once instead of holding the shutdown until its timeout, and a start
    still waiting for the bus gives up."""

    def __init__(self) -> None:
        self._callbacks: set[Callable[[], None]] = set()
        self._requested = asyncio.Event()

    @property
    def requested(self) -> bool:
        return self._requested.is_set()

    async def wait(self) -> None:
        await self._requested.wait()

    def on_request(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` on a stop request; returns the callable that undoes this."""
        self._callbacks.add(callback)
        return lambda: self._callbacks.discard(callback)

    def request(self) -> None:
        self._requested.set()
        for callback in list(self._callbacks):
            callback()


@dataclass(frozen=True)
class Resources:
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    nc: NATS
    js: JetStreamContext
    cache: StateCache
    shutdown: Shutdown
    settings: Settings
    # What the gateway last learnt of the bus's storage (a refused publish): for readiness.
    bus_storage: BusStorage = field(default_factory=BusStorage)


@contextlib.asynccontextmanager
async def open_resources(settings: Settings, shutdown: Shutdown) -> AsyncIterator[Resources]:
    """Open the engine, the bus (with its streams) and the cache; drain and close on exit."""
    engine = make_engine(settings.effective_database_url)
    cache = make_cache(settings.redis_url)
    try:
        nc = await _connect(settings, shutdown)
        try:
            js = nc.jetstream()
            await bus.ensure_streams(
                js, settings.stream_replicas, settings.actor_partitions, settings.nats_max_store
            )
            yield Resources(engine, make_sessionmaker(engine), nc, js, cache, shutdown, settings)
        finally:
            # Drain delivers what is in flight (acks of our publishes) before closing.
            try:
                await nc.drain()
            except Exception as exc:  # a bus that is gone has nothing to drain: just close
                log.warning("nats drain failed: %s", exc)
                # Publishes buffered while the bus was away fail to flush: nothing to keep.
                with contextlib.suppress(Exception):
                    await nc.close()
    finally:
        await cache.close()
        await engine.dispose()


async def _connect(settings: Settings, shutdown: Shutdown) -> NATS:
    """Wait for the bus as long as it takes (an outage is not a crash), unless told to stop."""
    url = settings.effective_nats_url
    connecting = asyncio.ensure_future(
        bus.connect(
            url, "gateway", settings.nats_user, settings.nats_password, ca=settings.nats_tls_ca
        )
    )
    stopping = asyncio.ensure_future(shutdown.wait())
    try:
        await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if not connecting.done():
        connecting.cancel()
        raise StartupAborted(f"stopped while waiting for the event bus at {url}")
    return connecting.result()


def provide_resources(state: State) -> Resources:
    return state.resources


def require_bus(nc: NATS) -> None:
    """Refuse a change early while the bus is down, before anything is written."""
    if not nc.is_connected:
        raise Unavailable("the event bus is unreachable; try again later")
