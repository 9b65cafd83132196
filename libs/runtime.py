"""How every worker process starts and stops: settings, logs, signals, the bus, the
database and the cache, health and metrics, its status on the bus, drain. A worker's
`__main__` is `runtime.serve(name, work)`: `work` gets the opened `Process`."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from libs import bus, health, logs, loop_health, service_status, tracing
from libs import settings as settings_mod
from libs.cache import StateCache, make_cache
from libs.db.engine import make_engine, make_sessionmaker
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
    tracing.setup(service)  # by the OTEL_* variables: off (and free) unless an exporter is named
    freeze_startup_objects()
    give_back_large_blocks()

    async def supervise() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        lag = asyncio.create_task(loop_health.watch_loop())
        try:
            await main(settings, stop)
        finally:
            lag.cancel()

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


# How many collections of the middle generation before a full one (CPython's default: 10). A
# full collection walks every object the process holds, its event loop held; with the
# default an actors process at 1,000 events/s ran one every ~5 s (17-32 ms each, freeing
# nothing: its objects are freed by reference counting), the soak's tail latency. The young
# threshold stays small: at 10,000 instead of 700 the full passes went, but each young and
# middle pass grew to 5-25 ms (e2e (d) p99 16.1 ms against 4.9 with this).
GC_FULL_AFTER = 100


def freeze_startup_objects() -> None:
    """Move what importing made (modules, classes: tens of thousands of objects that live as
    long as the process) out of the collector's reach, so that a full collection while
    events flow walks only what the work made, and make full collections rarer
    (`GC_FULL_AFTER`): shorter and fewer pauses, lower tail latency."""
    gc.collect()
    gc.freeze()
    young, older, _ = gc.get_threshold()
    gc.set_threshold(young, older, GC_FULL_AFTER)
    loop_health.install()  # from here on, each collection's pause is measured


# glibc raises its mmap threshold to the size of a large block once one is freed (up to 32 MiB)
# and keeps later blocks of that size in its heap: a sign-in's 19 MiB Argon2 block then stayed
# in the gateway's RSS for good (+19 MB from the first sign-in on). At a fixed threshold (glibc's
# default, 128 KiB) every large block is mapped afresh and given back when freed.
MMAP_THRESHOLD = 128 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt's parameter (malloc.h)


def give_back_large_blocks() -> None:
    """Have the C allocator return every large block to the system when it is freed (glibc:
    its mmap threshold fixed); nothing where there is no `mallopt` (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


class Bound(Protocol):
    """A worker whose `bound` is set while its consumers are bound (or it stands by, ready
    to take over, as the worker defines it)."""

    bound: asyncio.Event


READY_CHECK_TIMEOUT_S = 2.0


@dataclass
class Process:
    """What a worker process holds open while it runs (`opened`), and whether it is ready:
    the bus connected, the database reachable, and each consumer it was told of bound."""

    name: str
    settings: Settings
    stop: asyncio.Event
    nc: NATS
    js: JetStreamContext
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    cache: StateCache
    _bound: list[tuple[str, asyncio.Event]] = field(default_factory=list, init=False)
    _waiting: str | None = field(default=None, init=False)  # what it waits to be provisioned

    def ready_when(self, *consumers: Bound | asyncio.Event) -> None:
        """Be ready only while each of these is bound: a worker with a `bound` event, or
        an event of the caller's. Until the first call the process is not ready."""
        for consumer in consumers:
            if isinstance(consumer, asyncio.Event):
                self._bound.append(("its work", consumer))
            else:
                what = getattr(consumer, "durable", None) or type(consumer).__name__
                self._bound.append((str(what), consumer.bound))

    async def provisioned(self, needs: Sequence[tuple[str, str | None]]) -> bool:
        """Wait until the gateway has provisioned `needs` (see `bus.wait_provisioned`), not
        ready meanwhile; False if stopped first."""
        if not needs:
            return True
        self._waiting = ", ".join(f"{s}/{d}" if d else s for s, d in needs)
        try:
            return await bus.wait_provisioned(self.js, needs, self.stop)
        finally:
            self._waiting = None

    async def ready(self) -> str | None:
        """None when ready, else why not (the first reason found)."""
        if not self.nc.is_connected:
            return "the bus is unreachable"
        if self._waiting:
            return f"waiting for the gateway to provision {self._waiting}"
        try:
            async with asyncio.timeout(READY_CHECK_TIMEOUT_S), self.engine.connect() as db:
                await db.execute(text("SELECT 1"))
        except Exception as exc:
            return f"the database is unreachable ({type(exc).__name__})"
        if not self._bound:
            return "its work has not started"
        unbound = [what for what, event in self._bound if not event.is_set()]
        if unbound:
            return f"not bound yet: {', '.join(unbound)}"
        return None


@contextlib.asynccontextmanager
async def opened(name: str, settings: Settings, stop: asyncio.Event) -> AsyncIterator[Process]:
    """Open the bus (as the service `name`, its credentials from the settings), the
    database and the cache; while the block runs serve `/health/*` and `/metrics` on
    SMARTHOME_HEALTH_PORT (when set) and write this process's status to the bus
    (`libs.service_status`); close everything in reverse on the way out."""
    engine = make_engine(settings.effective_database_url)
    cache = make_cache(settings.redis_url)
    try:
        nc = await bus.connect(
            settings.effective_nats_url,
            name,
            settings.nats_user,
            settings.nats_password,
            ca=settings.nats_tls_ca,
        )
        try:
            js = nc.jetstream()
            process = Process(
                name, settings, stop, nc, js, engine, make_sessionmaker(engine), cache
            )
            async with _serving(process):
                yield process
        finally:
            with contextlib.suppress(Exception):
                await nc.drain()
    finally:
        await cache.close()
        await engine.dispose()


@contextlib.asynccontextmanager
async def _serving(process: Process) -> AsyncIterator[None]:
    settings = process.settings
    server = None
    if settings.health_port:
        server = await health.serve(settings.http_host, settings.health_port, process.ready)
        log.info("health and metrics on %s:%s", settings.http_host, settings.health_port)
    me = service_status.identity(process.name, settings.http_host, settings.health_port)
    reporter = service_status.Reporter(process.nc, me, process.ready, settings.status_interval_s)
    done = asyncio.Event()
    reporting = asyncio.create_task(reporter.run(done), name="status")
    try:
        yield
    finally:
        done.set()
        await reporting
        if server is not None:
            server.close()


Work = Callable[[Process], Awaitable[None]]


Needs = Sequence[tuple[str, str | None]]


def serve(name: str, work: Work, needs: Needs | Callable[[Settings], Needs] = ()) -> None:
    """A worker's `__main__`: open the process (`opened`), wait for what it reads to be
    provisioned (`needs`, or what they are by the settings), then run `work` until
    SIGINT/SIGTERM sets `process.stop`."""

    async def main(settings: Settings, stop: asyncio.Event) -> None:
        async with opened(name, settings, stop) as process:
            if await process.provisioned(needs(settings) if callable(needs) else needs):
                await work(process)

    run(name, main)


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
