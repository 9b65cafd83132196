"""The platform's processes as they report themselves on the bus (`libs.service_status`),
and the gateway's own report: its status, and with it its streams' gauges.

The gateway provisions the streams, so it is the one that measures them: each replica reads
every stream's info on its status schedule (`SMARTHOME_STATUS_INTERVAL_S`) and reports what
it holds against its byte budget. Every replica reports the same values: read them with
`max`, never summed. With a consumer's acked-through sequence (`libs.consumer`) they tell
how close its backlog is to the oldest messages a full stream drops.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError
from prometheus_client import Gauge

from libs import bus, service_status
from libs.errors import Unavailable
from libs.service_status import ServiceState, ServiceStatus
from services.gateway.health.service import HealthService
from services.gateway.resources import Resources
from services.gateway.system.schemas import ServiceProcess

READ_TIMEOUT_S = 5.0
STREAM_INFO_TIMEOUT_S = 2.0

STREAM_MESSAGES = Gauge(
    "smarthome_stream_messages", "Messages a stream holds (stream info)", ["stream"]
)
STREAM_BYTES = Gauge("smarthome_stream_bytes", "Bytes a stream holds (stream info)", ["stream"])
STREAM_MAX_BYTES = Gauge(
    "smarthome_stream_max_bytes",
    "A stream's byte budget, past which it drops its oldest messages (0: none)",
    ["stream"],
)
STREAM_LAST_SEQ = Gauge(
    "smarthome_stream_last_seq", "The sequence of the newest message a stream stored", ["stream"]
)


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


async def measure_streams(js: JetStreamContext) -> None:
    """Set the stream gauges from each platform stream's info. A stream that does not
    answer (the bus away or slow) keeps its last values until it does."""

    async def measure(name: str) -> None:
        try:
            async with asyncio.timeout(STREAM_INFO_TIMEOUT_S):
                info = await js.stream_info(name)
        except (TimeoutError, nats.errors.Error):
            return
        STREAM_MESSAGES.labels(name).set(info.state.messages)
        STREAM_BYTES.labels(name).set(info.state.bytes)
        STREAM_MAX_BYTES.labels(name).set(max(info.config.max_bytes or 0, 0))  # -1: none
        STREAM_LAST_SEQ.labels(name).set(info.state.last_seq)

    await asyncio.gather(*(measure(config.name) for config in bus.STREAMS if config.name))


@contextlib.asynccontextmanager
async def reporting(resources: Resources) -> AsyncIterator[None]:
    """Write the gateway's own status while it runs (its readiness: the bus stores), and
    measure the streams on the same schedule."""
    health = HealthService(resources)

    async def ready() -> str | None:
        try:
            await health.ready()
        except Unavailable as exc:
            return str(exc)
        return None

    settings = resources.settings
    me = service_status.identity("gateway", settings.http_host, settings.http_port)
    reporter = service_status.Reporter(
        resources.nc,
        me,
        ready,
        settings.status_interval_s,
        measure=lambda: measure_streams(resources.js),
    )
    done = asyncio.Event()
    task = asyncio.create_task(reporter.run(done), name="status")
    try:
        yield
    finally:
        done.set()
        await task
