"""The platform's processes as they report themselves on the bus (`libs.service_status`),
and the gateway's own report."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError

from libs import service_status
from libs.errors import Unavailable
from libs.service_status import ServiceState, ServiceStatus
from services.gateway.health.service import HealthService
from services.gateway.resources import Resources
from services.gateway.system.schemas import ServiceProcess

READ_TIMEOUT_S = 5.0


def shown(status: ServiceStatus, now: float) -> ServiceProcess:
    gone = status.state is ServiceState.GONE
    return ServiceProcess(
        name=status.name,
        instance=status.instance,
        state=status.state,
        ready=status.ready,
        why_not_ready=status.why_not_ready,
        restarts=status.restarts,
        uptime_s=None if gone else round(max(0.0, now - status.started_at), 1),
        version=status.version,
        metrics_url=status.metrics_url,
        last_seen=datetime.fromtimestamp(status.at, UTC),
        consumers=[] if gone else status.consumers,
    )


class SystemService:
    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    async def services(self) -> list[ServiceProcess]:
        """Every process's last report; Unavailable while the bus does not answer."""
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                statuses = await service_status.read_all(self._js)
        except BucketNotFoundError:
            raise Unavailable("the bus is not provisioned yet; try again later") from None
        except (TimeoutError, nats.errors.Error) as exc:
            raise Unavailable(
                f"the event bus does not answer ({type(exc).__name__}); try again later"
            ) from exc
        now = time.time()
        return [shown(s, now) for s in statuses]


@contextlib.asynccontextmanager
async def reporting(resources: Resources) -> AsyncIterator[None]:
    """Write the gateway's own status while it runs (its readiness: the bus stores)."""
    health = HealthService(resources)

    async def ready() -> str | None:
        try:
            await health.ready()
        except Unavailable as exc:
            return str(exc)
        return None

    settings = resources.settings
    me = service_status.identity("gateway", settings.http_host, settings.http_port)
    reporter = service_status.Reporter(resources.nc, me, ready, settings.status_interval_s)
    done = asyncio.Event()
    task = asyncio.create_task(reporter.run(done), name="status")
    try:
        yield
    finally:
        done.set()
        await task
