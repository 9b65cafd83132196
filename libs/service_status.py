"""What each process says about itself, for `GET /api/v1/system/services`.

Every process (the workers through `libs.runtime`, the gateway from its lifespan) rewrites
its own entry in the JetStream KV bucket `services` every `SMARTHOME_STATUS_INTERVAL_S` (5 s
by default): key `<name>.<instance>`, value a `ServiceStatus`. The gateway reads the bucket.
Nothing watches the processes but themselves, so it works the same under `smarthome up` and
in Kubernetes.
A process that dies stops writing: its entry is seen `gone` once it has missed
`GONE_AFTER` writes, and the bucket's `max_age` removes it a minute later; a clean stop
deletes it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.metadata
import logging
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum

import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BadRequestError
from nats.js.kv import KeyValue
from prometheus_client import REGISTRY, CollectorRegistry

from libs import kv as kv_read
from libs.health import ReadyCheck

log = logging.getLogger(__name__)

BUCKET = "services"
GONE_AFTER = 3  # missed writes after which it is seen gone
KEEP_S = 60.0  # the bucket's max_age: a dead process's entry is removed after this
READ_WAIT_S = 2.0

# Facts about this process that its supervisor knows, not configuration: how often the
# launcher has started it before (Kubernetes counts restarts itself: 0 there), and a
# stable instance name (the launcher's: the host's; default: host and pid).
RESTARTS_ENV = "SMARTHOME_RESTARTS"
INSTANCE_ENV = "SMARTHOME_INSTANCE"


class ServiceState(StrEnum):
    STARTING = "starting"  # not ready yet since it started
    READY = "ready"
    NOT_READY = "not_ready"  # it was ready, and is not now (why_not_ready says why)
    GONE = "gone"  # it stopped writing: dead, hung or cut off from the bus


class ConsumerLag(msgspec.Struct, frozen=True):
    """One durable consumer of a process, as its `/metrics` last showed it (the gauges
    `smarthome_consumer_pending_messages` and `…_ack_pending_messages`, read from consumer
    info): messages not yet delivered to it, and delivered but not yet acknowledged."""

    stream: str
    consumer: str
    pending: int
    ack_pending: int | None  # None: this process does not measure it


class ServiceStatus(msgspec.Struct, frozen=True):
    """One process's own account of itself, as written to the bucket. Unknown fields are
    ignored on reading: during a rolling upgrade a newer process may write more (and an
    older one less: hence the defaults)."""

    name: str
    instance: str
    state: ServiceState
    ready: bool
    why_not_ready: str | None
    restarts: int
    started_at: float  # Unix seconds
    at: float  # when this was written, Unix seconds
    every_s: float  # how often it is rewritten
    version: str
    metrics_url: str | None
    consumers: list[ConsumerLag] = []


_decoder = msgspec.json.Decoder(ServiceStatus)


def decode(data: bytes) -> ServiceStatus:
    return _decoder.decode(data)


def key(name: str, instance: str) -> str:
    """The entry's key; KV keys allow letters, digits and `-_=/.` only."""
    return f"{name}.{re.sub(r'[^A-Za-z0-9_=-]', '_', instance)}"


# --- what a reader sees (pure) ------------------------------------------------------------------


def seen_state(status: ServiceStatus, now: float) -> ServiceState:
    """Its state at `now`: as written, or gone once it has missed GONE_AFTER writes."""
    if now - status.at > GONE_AFTER * status.every_s:
        return ServiceState.GONE
    return status.state


def seen(status: ServiceStatus, now: float) -> ServiceStatus:
    """The entry as a reader should show it at `now`: a gone one is not ready, and says
    since when nothing was heard of it."""
    if seen_state(status, now) is not ServiceState.GONE:
        return status
    silent = now - status.at
    return msgspec.structs.replace(
        status,
        state=ServiceState.GONE,
        ready=False,
        why_not_ready=f"no word from it for {silent:.0f} s",
    )


def state_of(reason: str | None, was_ready: bool) -> ServiceState:
    if reason is None:
        return ServiceState.READY
    return ServiceState.NOT_READY if was_ready else ServiceState.STARTING


PENDING_METRIC = "smarthome_consumer_pending_messages"
ACK_PENDING_METRIC = "smarthome_consumer_ack_pending_messages"


def consumer_lag(registry: CollectorRegistry = REGISTRY) -> list[ConsumerLag]:
    """This process's consumers' lag, as its `/metrics` shows it now: the same gauges,
    so that the status page and Prometheus never disagree."""
    values: dict[str, dict[tuple[str, str], float]] = {PENDING_METRIC: {}, ACK_PENDING_METRIC: {}}
    for family in registry.collect():
        found = values.get(family.name)
        if found is None:
            continue
        for sample in family.samples:
            labels = sample.labels
            if "stream" in labels and "consumer" in labels:
                found[(labels["stream"], labels["consumer"])] = sample.value
    ack = values[ACK_PENDING_METRIC]
    return [
        ConsumerLag(
            stream=stream,
            consumer=consumer,
            pending=int(pending),
            ack_pending=int(ack[(stream, consumer)]) if (stream, consumer) in ack else None,
        )
        for (stream, consumer), pending in sorted(values[PENDING_METRIC].items())
    ]


# --- who this process is ------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    name: str
    instance: str
    restarts: int
    version: str
    metrics_url: str | None

    @property
    def key(self) -> str:
        return key(self.name, self.instance)


def identity(name: str, host: str, metrics_port: int, metrics_path: str = "/metrics") -> Identity:
    """This process's identity, read once at start; `metrics_port` 0: it serves no metrics."""
    try:
        restarts = max(0, int(os.environ.get(RESTARTS_ENV) or 0))
    except ValueError:
        restarts = 0
    instance = os.environ.get(INSTANCE_ENV) or f"{socket.gethostname()}-{os.getpid()}"
    url = f"http://{advertised(host)}:{metrics_port}{metrics_path}" if metrics_port else None
    return Identity(name, instance, restarts, version(), url)


def advertised(host: str) -> str:
    """The address others reach a listener on `host` by: a wildcard (in a pod) is the
    address the host name resolves to (the pod's IP in Kubernetes)."""
    if host not in ("", "0.0.0.0", "::"):
        return f"[{host}]" if ":" in host else host
    with contextlib.suppress(OSError):
        return socket.gethostbyname(socket.gethostname())
    return socket.gethostname()


def version() -> str:
    try:
        return importlib.metadata.version("smarthome")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# --- the bucket ---------------------------------------------------------------------------------


async def provision(js: JetStreamContext, replicas: int = 1) -> None:
    """Create (or update) the bucket: the gateway, which provisions the bus, runs this."""
    config = KeyValueConfig(
        bucket=BUCKET, history=1, ttl=KEEP_S, storage=StorageType.FILE, replicas=replicas
    )
    try:
        await js.create_key_value(config)
    except BadRequestError:  # there with another configuration (replicas): update it
        info = await js.stream_info(f"KV_{BUCKET}")
        await js.update_stream(
            dataclasses.replace(info.config, max_age=KEEP_S, num_replicas=replicas)
        )


async def read_all(js: JetStreamContext, now: float | None = None) -> list[ServiceStatus]:
    """Every process's entry as seen now (gone ones included), by name and instance.
    Raises BucketNotFoundError when the bus was not provisioned, TimeoutError when the
    entries did not all come within `READ_WAIT_S` of each other."""
    kv = await js.key_value(BUCKET)
    try:
        current = await kv_read.entries(kv, wait=READ_WAIT_S)
    except TimeoutError:  # not all delivered: a partial list would mislead
        raise TimeoutError("the status bucket was not read to its end") from None
    found: dict[str, ServiceStatus] = {}
    for entry in current:
        if not entry.value:
            continue
        try:
            found[entry.key] = decode(entry.value)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("unreadable status %s: %s", entry.key, exc)
    at = time.time() if now is None else now
    return sorted((seen(s, at) for s in found.values()), key=lambda s: (s.name, s.instance))


class Reporter:
    """Writes this process's status every `every` seconds (the settings'
    `status_interval_s`) until `stop`; a clean stop deletes it. The bus being away (or the
    bucket not provisioned yet) only delays it: nothing is written while disconnected
    (nats-py would buffer it, and a close while the bus is still away fails on writing
    that buffer). `measure`: what else the process reads from the bus on the same schedule,
    after each write while connected (the gateway: its streams' gauges); it handles its own
    errors."""

    def __init__(
        self,
        nc: NATS,
        me: Identity,
        ready: ReadyCheck,
        every: float,
        measure: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self.me = me
        self._ready = ready
        self._every = every
        self._measure = measure
        self.started_at = time.time()
        self._was_ready = False
        self._kv: KeyValue | None = None
        self._warned = False

    async def status(self) -> ServiceStatus:
        reason = await self._ready()
        state = state_of(reason, self._was_ready)
        self._was_ready = self._was_ready or reason is None
        return ServiceStatus(
            name=self.me.name,
            instance=self.me.instance,
            state=state,
            ready=reason is None,
            why_not_ready=reason,
            restarts=self.me.restarts,
            started_at=self.started_at,
            at=time.time(),
            every_s=self._every,
            version=self.me.version,
            metrics_url=self.me.metrics_url,
            consumers=consumer_lag(),
        )

    async def write(self) -> None:
        status = await self.status()
        if not self._nc.is_connected:
            return
        try:
            if self._kv is None:
                self._kv = await self._js.key_value(BUCKET)
            await self._kv.put(self.me.key, msgspec.json.encode(status))
            self._warned = False
        except Exception as exc:  # the bus is away, or not provisioned yet
            if not self._warned:
                log.info("status not written (%s); trying again", type(exc).__name__)
                self._warned = True
        if self._measure is not None:
            await self._measure()

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not stop.is_set():
                began = loop.time()
                await self.write()
                # On schedule: a slow check or write does not stretch the interval.
                wait = max(0.0, began + self._every - loop.time())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
        finally:
            if self._kv is not None and self._nc.is_connected:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._kv.delete(self.me.key), READ_WAIT_S)
