"""The platform under a simulated fleet, for `soak.py`: `smarthome up --no-demo` on free
ports, the simulator as its own process, and what is sampled while it runs (consumer lags,
each process's CPU and RSS, events acknowledged, dead letters, event → state fact latency).

A sibling module, not a package, like `harness.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import nats
from harness import (
    MB,
    BenchError,
    Child,
    ProcessSample,
    ProcessTree,
    cause_decoder,
    consumer_lags,
    lag_group,
    percentile,
    service_env,
    slope,
)
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from libs import bus_grants, embedded_nats, service_status, subjects

ACTORS_JOIN_S = 5.0  # how long the launcher has to start its actors processes
KINDS_SENSOR_EVERY = 3  # the simulator's kinds in turn: sensor, light, energy_meter


class EventId(msgspec.Struct):
    id: str


event_id_decoder = msgspec.json.Decoder(EventId)


# --- the platform ---------------------------------------------------------------------


class Platform:
    """`smarthome up --no-demo` in a directory of its own, on free ports."""

    def __init__(
        self,
        tmp: Path,
        database_url: str,
        redis_url: str | None,
        actors: int,
        max_store: str | None = None,
    ) -> None:
        self.tmp = tmp
        self.data = tmp / "data"
        self.http_port = embedded_nats.free_port()
        self.nats_port = embedded_nats.free_port()
        self.api_url = f"http://127.0.0.1:{self.http_port}"
        self.nats_url = f"nats://127.0.0.1:{self.nats_port}"
        self.actors = actors
        self.env = service_env(self.nats_url, database_url, self.data, redis_url)
        del self.env["NATS_URL"]  # the launcher runs the bus
        self.env.update(
            SMARTHOME_HTTP_PORT=str(self.http_port),
            SMARTHOME_NATS_PORT=str(self.nats_port),
            SMARTHOME_MQTT_PORT="0",
            SMARTHOME_ADMIN_PASSWORD=secrets.token_urlsafe(16),
            SMARTHOME_ACTOR_PROCESSES=str(actors),
            SMARTHOME_LOGINS_PER_MINUTE="1000",
        )
        if max_store:  # the streams' byte budgets are its shares: reached within the run
            self.env["SMARTHOME_NATS_MAX_STORE"] = max_store
        # The devices are not heart-beating: their readings every interval keep them online.
        self.env.pop("SMARTHOME_HEARTBEAT_TIMEOUT", None)
        argv = [sys.executable, "-m", "services.cli", "up", "--no-demo"]
        self.launcher = Child("launcher", argv, self.env, tmp / "launcher.log")
        self.extra: list[Child] = []
        self.tree: ProcessTree | None = None
        self.nc: NATS | None = None
        self.note = ""

    async def start(self) -> JetStreamContext:
        await asyncio.to_thread(self.launcher.start, f"{self.api_url}/health/ready", timeout=180.0)
        self.tree = ProcessTree(self.launcher.pid)
        self.tree.add("bench", os.getpid())
        self.tree.add("launcher", self.launcher.pid)
        # The shared servers of this run, when it has them (their CPU is part of the cost).
        servers = ("postgres",) if self.env["DATABASE_URL"].startswith("postgres") else ()
        redis = ("redis-server",) if "REDIS_URL" in self.env else ()
        self.tree.add_servers(*servers, *redis)
        passwords = bus_grants.ensure_service_passwords(self.data / "bus")
        self.nc = await nats.connect(
            self.nats_url, name="soak", user="operator",
            password=passwords["operator"].password,
            inbox_prefix=bus_grants.inbox_prefix("svc", "operator"),
        )  # fmt: skip
        await self._enough_actors(passwords)
        return self.nc.jetstream()

    async def _enough_actors(self, passwords: dict[str, bus_grants.ServicePassword]) -> None:
        """The launcher's actors processes, and the bench's if it ran fewer than asked."""
        assert self.tree is not None
        for _ in range(int(ACTORS_JOIN_S / 0.5)):
            if len(self.tree.pids("actors")) >= self.actors:
                break
            await asyncio.sleep(0.5)
        running = len(self.tree.pids("actors"))
        if running >= self.actors:
            self.note = f"{running} actors processes, started by the launcher"
            return
        for n in range(running, self.actors):
            port = embedded_nats.free_port()
            env = {
                **self.env,
                **bus_grants.service_env(passwords, "actors"),
                "NATS_URL": self.nats_url,
                "SMARTHOME_HEALTH_PORT": str(port),
                "SMARTHOME_HTTP_HOST": "127.0.0.1",
                service_status.INSTANCE_ENV: f"{socket.gethostname()}-bench-{n}",
            }
            argv = [sys.executable, "-m", "services.actors"]
            child = Child(f"actors#{n + 1}", argv, env, self.tmp / f"actors-{n}.log", port)
            self.extra.append(child)
            await asyncio.to_thread(child.start, f"http://127.0.0.1:{port}/health/ready", 60.0)
            self.tree.add(child.name, child.pid)
        self.note = (
            f"{self.actors} actors processes: {running} started by the launcher (it does not "
            f"honour SMARTHOME_ACTOR_PROCESSES yet), {self.actors - running} by the bench"
        )

    def check_alive(self) -> None:
        self.launcher.check_alive()
        for child in self.extra:
            child.check_alive()

    async def stop(self) -> None:
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), 10)
        for child in [*self.extra, self.launcher]:
            await asyncio.to_thread(child.stop, 90.0)


def simulator(
    platform: Platform,
    prefix: str,
    devices: int,
    interval: float,
    seconds: float,
    key: str,
    nice: int = 0,
) -> Child:
    """The simulator as its own process: registers its devices, then reports for `seconds`,
    at `nice` more niceness than the bench."""
    argv = [
        sys.executable, "-m", "devices.simulator", "--count", str(devices),
        "--interval", f"{interval:g}", "--duration", f"{seconds:g}", "--prefix", prefix,
        "--api-url", platform.api_url, "--nats-url", platform.nats_url,
    ]  # fmt: skip
    env = {**os.environ, "SMARTHOME_API_TOKEN": key, "SMARTHOME_LOG_LEVEL": "INFO"}
    log = platform.tmp / f"simulator-{prefix}-{time.monotonic_ns()}.log"
    return Child("simulator", argv, env, log, nice=nice)


def simulator_acked(child: Child) -> int | None:
    """The simulator's own count of events acknowledged, from its summary."""
    found = re.search(r"events acknowledged: (\d+)", child.tail(chars=10_000))
    return int(found.group(1)) if found else None


# --- what is sampled --------------------------------------------------------------------


@dataclass
class Sample:
    t: float  # seconds since the simulator started
    phase: str  # `register`, `hello` (the burst of hellos, then phases), `load`, `drain`
    acked: int  # messages in EVENTS
    dead: int  # messages in DEADLETTER
    lags: dict[str, int]
    procs: dict[str, ProcessSample]
    load1: float

    @property
    def lag(self) -> int:
        return sum(self.lags.values())

    def grouped(self) -> dict[str, int]:
        groups: dict[str, int] = {}
        for key, n in self.lags.items():
            group = lag_group(key.partition("/")[2])
            groups[group] = groups.get(group, 0) + n
        return groups


async def stream_count(js: JetStreamContext, stream: str) -> int:
    """The messages the stream has stored since it was made, those its byte budget has
    dropped since included (`--nats-max-store`): its last sequence (a fresh stream)."""
    return (await js.stream_info(stream)).state.last_seq


async def take_sample(js: JetStreamContext, tree: ProcessTree, t: float, phase: str) -> Sample:
    return Sample(
        t=t,
        phase=phase,
        acked=await stream_count(js, subjects.EVENTS_STREAM),
        dead=await stream_count(js, subjects.DEADLETTER_STREAM),
        lags=await consumer_lags(js),
        procs=tree.sample(),
        load1=os.getloadavg()[0],
    )


@dataclass
class LatencyProbe:
    """Event → state fact latency of a sample of devices, both times taken here."""

    sent: dict[str, float] = field(default_factory=dict)
    received: dict[str, float] = field(default_factory=dict)
    counting: bool = False

    async def subscribe(self, nc: NATS, device_ids: list[str]) -> None:
        for device_id in device_ids:
            await nc.subscribe(subjects.device_events(device_id, "telemetry"), cb=self._event)
            await nc.subscribe(subjects.device_state(device_id), cb=self._fact)
        await nc.flush()

    async def _event(self, msg: Msg) -> None:
        if self.counting:
            self.sent[event_id_decoder.decode(msg.data).id] = time.perf_counter()

    async def _fact(self, msg: Msg) -> None:
        at = time.perf_counter()
        cause = cause_decoder.decode(msg.data).cause_event_id
        if cause in self.sent:
            self.received.setdefault(cause, at)

    def latencies_ms(self) -> list[float]:
        return sorted(ms for _, ms in self.timeline())

    def timeline(self) -> list[tuple[float, float]]:
        """(when the event was seen, its latency in ms) of each matched event, in time order."""
        return sorted(
            (t, (self.received[i] - t) * 1000) for i, t in self.sent.items() if i in self.received
        )

    def p99_by_window(self, width_s: float) -> list[float]:
        """The p99 of each `width_s` of the timeline: a periodic cause shows as a pattern."""
        windows: dict[int, list[float]] = {}
        timeline = self.timeline()
        for t, ms in timeline:
            windows.setdefault(int((t - timeline[0][0]) // width_s), []).append(ms)
        return [percentile(sorted(w), 99) for _, w in sorted(windows.items())]


def sample_devices(prefix: str, devices: int, count: int) -> list[str]:
    """`count` sensors spread over the fleet (a sensor's reading nearly always moves, so it
    makes a state fact: two random walks rounded to 0.01 leave both values as they were about
    once in 4,000 readings, the soak's few events "without a fact"; a light's telemetry
    repeats its state and makes none)."""
    sensors = list(range(0, devices, KINDS_SENSOR_EVERY))
    step = max(1, len(sensors) // max(1, count))
    return [f"{prefix}-{n}" for n in sensors[::step][:count]]


# --- one load run -------------------------------------------------------------------------

HELLO_GATEWAY_CPU = 20.0  # % of a core: the gateway answering hellos uses 70-90
HELLO_MAX_S = 120.0


@dataclass
class LoadRun:
    """What one simulator run under sampling saw."""

    samples: list[Sample]
    registered_s: float
    load_from: float  # `t` where the steady load began (after the hello burst)
    load_until: float

    def window(self) -> list[Sample]:
        return [s for s in self.samples if self.load_from <= s.t <= self.load_until]

    def rate(self) -> float:
        w = self.window()
        if len(w) < 2 or w[-1].t == w[0].t:
            return 0.0
        return (w[-1].acked - w[0].acked) / (w[-1].t - w[0].t)

    def lag_growth(self) -> float:
        """Events the total lag grew by over the window (least-squares)."""
        w = self.window()
        if len(w) < 2:
            return 0.0
        return slope([(s.t, float(s.lag)) for s in w]) * (w[-1].t - w[0].t)

    def lag_flat(self) -> bool:
        return self.lag_growth() <= max(self.rate(), 100.0)


async def load_run(
    js: JetStreamContext,
    platform: Platform,
    sim: Child,
    every: float,
    interval: float,
    seconds: float,
    probe: LatencyProbe | None = None,
) -> LoadRun:
    """Start the simulator and sample until it exits (its registrations, then its load for
    `seconds`, then its goodbyes: a burst, outside the load window)."""
    assert platform.tree is not None
    await asyncio.to_thread(sim.spawn)
    platform.tree.add("simulator", sim.pid)
    started = time.monotonic()
    samples: list[Sample] = []
    registered: float | None = None
    load_from = load_until = 0.0
    loading = False
    ends = float("inf")  # of the load: the simulator's goodbyes may begin after it
    while sim.proc is not None and sim.proc.poll() is None:
        platform.check_alive()
        now = time.monotonic() - started
        if registered is None and "registered" in sim.tail(chars=100_000):
            registered = now
            ends = now + seconds - every  # (seen up to `every` after it happened)
        if (
            registered is not None
            and not loading
            and now <= ends
            and hellos_answered(samples, registered, now, interval, every)
        ):
            loading, load_from = True, now
            if probe is not None:
                probe.counting = True
        if loading and now > ends:
            loading = False
            if probe is not None:
                probe.counting = False
        phase = "register" if registered is None else ("load" if loading else "hello")
        phase = "goodbye" if now > ends else phase
        samples.append(await take_sample(js, platform.tree, now, phase))
        if loading:
            load_until = now
        await asyncio.sleep(max(0.0, every - (time.monotonic() - started - now)))
    if probe is not None:
        probe.counting = False
    if registered is None:
        raise BenchError(f"the simulator exited before registering:\n{sim.tail()}")
    return LoadRun(samples, registered, load_from, load_until)


def hellos_answered(
    samples: list[Sample], registered: float, now: float, interval: float, every: float
) -> bool:
    """Whether the burst after the registrations is over, and the steady load begins: every
    device says hello first, then reports at its own phase; the gateway looks each hello up
    (10,000 hellos keep it busy for tens of seconds on 2 cores, with the readings already
    flowing). Over once a reading interval has passed and the gateway's CPU has fallen back
    to its steady level, or after `HELLO_MAX_S` whatever it is."""
    if now < registered + min(interval, 10.0) + every:
        return False
    if now >= registered + HELLO_MAX_S:
        return True
    last = samples[-1].procs.get("gateway") if samples else None
    return last is None or last.cpu < HELLO_GATEWAY_CPU


async def drain(js: JetStreamContext, platform: Platform, timeout: float) -> float:
    """Until no durable has anything pending or un-acked: the seconds it took."""
    assert platform.tree is not None
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        platform.check_alive()
        if not any((await consumer_lags(js)).values()):
            return time.monotonic() - began
        await asyncio.sleep(0.5)
    lags = {k: n for k, n in (await consumer_lags(js)).items() if n}
    raise BenchError(f"not drained within {timeout:g}s: {lags}")


# --- the report ---------------------------------------------------------------------------


def print_samples(samples: list[Sample]) -> None:
    """One line per sample: rate, lag by consumer group, each process's CPU % and RSS MB."""
    groups = sorted({g for s in samples for g in s.grouped()})
    procs = sorted({p for s in samples for p in s.procs})
    head = ["t s", "phase", "ev/s", "dead", *(f"lag {g}" for g in groups)]
    head += [f"{p} cpu%/MB" for p in procs] + ["load"]
    rows = []
    previous: Sample | None = None
    for s in samples:
        rate = "-"
        if previous is not None and s.phase != "drain" and s.t > previous.t:
            rate = f"{(s.acked - previous.acked) / (s.t - previous.t):,.0f}"
        grouped = s.grouped()
        row = [f"{s.t:.0f}", s.phase, rate, str(s.dead)]
        row += [f"{grouped.get(g, 0):,}" for g in groups]
        for p in procs:
            got = s.procs.get(p)
            row.append(f"{got.cpu:.0f}/{got.rss / MB:.0f}" if got else "-")
        rows.append([*row, f"{s.load1:.2f}"])
        previous = s
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)))
