"""What the benchmarks in ops/bench share: their child processes and their set-up and
tear-down (`Stage`), the sampling of their memory and CPU, a throwaway database, the state
facts they publish, percentiles, the printed table and the run as a whole (`run_bench`).

A sibling module, not a package: the benchmarks are run as scripts
(`python ops/bench/e2e.py`), whose directory is first on `sys.path`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
import psutil
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from libs import accounts, bus, embedded_nats, loop_health, subjects
from libs import messages as m
from libs.db.engine import make_engine, make_sessionmaker
from libs.db.migrate import upgrade
from libs.lease import ACTOR_BUCKET
from libs.principals import Role
from libs.settings import async_database_url

ROOT = Path(__file__).resolve().parents[2]
MB = 1_000_000
RSS_INTERVAL_S = 0.1
# Settings a caller's shell may hold: the services get only what this run sets.
INHERITED_SETTINGS = (
    "NATS_URL",
    "DATABASE_URL",
    "REDIS_URL",
    "SMARTHOME_DATA_DIR",
    "SMARTHOME_HTTP_HOST",
    "SMARTHOME_HTTP_PORT",
    "SMARTHOME_NATS_PORT",
    "SMARTHOME_HEALTH_PORT",
    "SMARTHOME_HEARTBEAT_TIMEOUT",
)


def service_env(
    nats_url: str, database_url: str, data_dir: Path, redis_url: str | None
) -> dict[str, str]:
    """The environment of the services: this one's, less what a caller's shell may have
    set for the platform, plus this run's settings."""
    env = {k: v for k, v in os.environ.items() if k not in INHERITED_SETTINGS}
    env.update(
        NATS_URL=nats_url,
        DATABASE_URL=database_url,
        SMARTHOME_DATA_DIR=str(data_dir),
        # No presence_timeout events in the middle of the latency run.
        SMARTHOME_HEARTBEAT_TIMEOUT="3600",
        # The bench writes as one principal with the load of many.
        SMARTHOME_WRITES_PER_MINUTE="0",  # off: one principal does the work of many
    )
    if redis_url:
        env["REDIS_URL"] = redis_url
    return env


class BenchError(RuntimeError):
    """The run cannot go on: a service died or a deadline passed."""


# --- processes -------------------------------------------------------------------------


class Child:
    """A process of the run: started here, stopped by SIGTERM (SIGKILL after a grace)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        log: Path,
        port: int = 0,
        nice: int = 0,  # added to this process's niceness
    ) -> None:
        self.name = name
        self.port = port
        self.nice = nice
        self.argv = argv
        self.env = env
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> Child:
        """Start the process and return at once (the caller waits for it)."""
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=functools.partial(os.nice, self.nice) if self.nice else None,
            )
        return self

    def start(self, ready_url: str, timeout: float = 30.0) -> Child:
        """Start the process and block until `ready_url` answers 200."""
        self.spawn()
        return self.wait_ready(ready_url, timeout)

    def wait_ready(self, ready_url: str, timeout: float = 30.0) -> Child:
        """Block until `ready_url` answers 200 (the process is spawned)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(ready_url, timeout=1).status_code == 200:
                    return self
            time.sleep(0.05)
        raise BenchError(f"{self.name} not ready within {timeout:g}s:\n{self.tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited {self.proc.returncode}:\n{self.tail()}")

    async def wait_for_log(self, needle: str, timeout: float = 30.0) -> None:
        """Until `needle` appears in the process's log (its JSON lines carry the message)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if needle in self.tail(chars=1_000_000):
                return
            await asyncio.sleep(0.05)
        raise BenchError(
            f"{self.name}: no {needle!r} in its log within {timeout:g}s:\n{self.tail()}"
        )

    def stop(self, grace: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def tail(self, chars: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


class ProcessSampler:
    """Peak resident memory of each watched process (and, unless told otherwise, its
    children), every 100 ms; and their CPU time, read at the edges of a phase.

    A thread, not a task: it keeps sampling while the event loop is busy publishing.
    Looking for children scans all of /proc, so the families are refreshed every second
    only; the memory of their members is read at every sample.
    """

    def __init__(self, interval: float = RSS_INTERVAL_S, refresh: float = 1.0) -> None:
        self.interval = interval
        self.refresh = refresh
        self.peaks: dict[str, int] = {}
        self._watched: dict[str, psutil.Process] = {}
        self._families: dict[str, list[psutil.Process]] = {}
        self._alone: set[str] = set()  # counted without their children
        self._refreshed = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def watch(self, name: str, pid: int, rss: bool = True, children: bool = True) -> None:
        with self._lock:
            self._watched[name] = psutil.Process(pid)
            if rss:
                self.peaks.setdefault(name, 0)
            if not children:
                self._alone.add(name)
            self._refreshed = 0.0
        self._sample()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def cpu_seconds(self) -> dict[str, float]:
        """User + system CPU seconds of each watched process and its children so far."""
        used = {}
        for name, (root, *children) in self._current_families(force=True).items():
            try:
                t = root.cpu_times()
            except psutil.Error:
                continue  # stopped: it has no share in what follows
            total = t.user + t.system
            for p in children:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system
            used[name] = total
        return used

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        for name, family in self._current_families().items():
            if name not in self.peaks:
                continue
            rss = 0
            for p in family:
                with contextlib.suppress(psutil.Error):
                    rss += p.memory_info().rss
            self.peaks[name] = max(self.peaks[name], rss)

    def _current_families(self, force: bool = False) -> dict[str, list[psutil.Process]]:
        with self._lock:
            if force or time.monotonic() - self._refreshed >= self.refresh:
                for name, proc in self._watched.items():
                    family = [proc]
                    if name not in self._alone:
                        with contextlib.suppress(psutil.Error):
                            family += proc.children(recursive=True)
                    self._families[name] = family
                self._refreshed = time.monotonic()
            return dict(self._families)


class CpuShare:
    """CPU used by each watched process over a phase, in % of one core."""

    def __init__(self, sampler: ProcessSampler) -> None:
        self._sampler = sampler
        self._before = sampler.cpu_seconds()
        self._started = time.perf_counter()

    def summary(self) -> str:
        after = self._sampler.cpu_seconds()
        wall = time.perf_counter() - self._started
        shares = (
            f"{name} {(after[name] - self._before.get(name, 0.0)) / wall:.0%}" for name in after
        )
        return "CPU (% of one core): " + ", ".join(shares)


class MachineShare:
    """Over a phase: how busy the whole machine was (% of all its CPUs) and the CPU of the
    shared servers beside the run (Postgres's and Redis's processes, whoever their client),
    in % of one core: what the watched processes' shares leave out."""

    SERVERS = ("postgres", "redis-server")

    def __init__(self) -> None:
        self._before = psutil.cpu_times()
        self._servers = self._server_seconds()
        self._started = time.perf_counter()

    def summary(self) -> str:
        after = psutil.cpu_times()
        wall = time.perf_counter() - self._started
        total = sum(after) - sum(self._before)
        idle = (after.idle + after.iowait) - (self._before.idle + self._before.iowait)
        busy = 1 - idle / total if total else 0.0
        servers = self._server_seconds()
        shares = ", ".join(
            f"{name} {(servers.get(name, 0.0) - self._servers.get(name, 0.0)) / wall:.0%}"
            for name in self.SERVERS
        )
        return f"machine {busy:.0%} busy ({psutil.cpu_count()} CPUs); servers: {shares}"

    @classmethod
    def _server_seconds(cls) -> dict[str, float]:
        used: dict[str, float] = {}
        for proc in psutil.process_iter(["name", "cpu_times"]):
            name, times = proc.info["name"], proc.info["cpu_times"]
            if name in cls.SERVERS and times is not None:
                used[name] = used.get(name, 0.0) + times.user + times.system
        return used


# --- a run's own processes ----------------------------------------------------------------


class Stage:
    """What a benchmark starts and must stop: its own nats-server, the services it spawns,
    a throwaway database and the bench's own connection; all that runs is sampled.
    `teardown` stops what was reached, the last started first. A bench's class extends it."""

    def __init__(self, tmp: Path, stop_grace: float = 20.0) -> None:
        self.tmp = tmp
        self.stop_grace = stop_grace
        self.sampler = ProcessSampler()
        self.children: list[Child] = []
        self.database: Database | None = None
        self.nc: NATS | None = None
        self.env: dict[str, str] = {}

    async def start_nats_server(self, sync: str, auth: str = "", children: bool = False) -> str:
        """A nats-server of this run's own (its log in the run's directory): its URL."""
        port = embedded_nats.free_port()
        log = self.tmp / "nats-server.log"
        start = partial(embedded_nats.start, self.tmp / "nats", port, log, sync, auth=auth)
        proc = await asyncio.to_thread(start)
        nats_server = Child("nats-server", list(proc.args), {}, log)  # type: ignore[arg-type]
        nats_server.proc = proc
        self.children.append(nats_server)
        self.sampler.watch("nats-server", proc.pid, children=children)
        return f"nats://127.0.0.1:{port}"

    async def open_database(self, given: str | None) -> Database:
        """A fresh database (`given`: a Postgres server; None: SQLite here), migrated."""
        self.database = await Database.create(given, self.tmp)
        await self.database.migrate()
        return self.database

    async def connect(self, nats_url: str) -> JetStreamContext:
        """The bench's connection, the platform's streams provisioned (as the gateway does)."""
        self.nc = await nats.connect(nats_url, name="bench")
        js = self.nc.jetstream()
        await bus.ensure_streams(js)
        return js

    def spawn_child(self, name: str, argv: list[str]) -> Child:
        """A service with a probe port of its own (`child.port`), started and sampled; the
        caller waits for it to be ready."""
        port = embedded_nats.free_port()
        env = {**self.env, "SMARTHOME_HEALTH_PORT": str(port)}
        child = Child(name, argv, env, self.tmp / f"{name}.log", port)
        self.children.append(child.spawn())
        self.sampler.watch(name, child.pid, children=False)
        return child

    async def wait_ready(self, child: Child, port: int, timeout: float = 30.0) -> None:
        """Until `child` answers 200 on its probe `port` (without blocking the loop)."""
        url = f"http://127.0.0.1:{port}/health/ready"
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=1) as client:
            while time.monotonic() < deadline:
                child.check_alive()
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(url)).status_code == 200:
                        return
                await asyncio.sleep(0.05)
        raise BenchError(f"{child.name} not ready within {timeout:g}s:\n{child.tail()}")

    async def teardown(self) -> None:
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), 10)
        for child in reversed(self.children):
            await asyncio.to_thread(child.stop, self.stop_grace)
        self.sampler.stop()
        if self.database is not None:
            try:
                await self.database.drop()
            except Exception as exc:
                print(f"bench: could not drop {self.database.url}: {exc}")


# --- the platform's processes, sampled --------------------------------------------------

# What a process of the platform is called here, after the module or program it runs.
PROGRAMS = (
    ("nats-server", "nats-server"),
    ("devices.simulator", "simulator"),
    ("services.cli", "launcher"),
    ("services.launcher", "launcher"),
)


def program_name(cmdline: list[str]) -> str | None:
    """`actors` for `python -m services.actors`, `nats-server`, `simulator`; None: not ours."""
    joined = " ".join(cmdline)
    for needle, name in PROGRAMS:
        if needle in joined:
            return name
    for arg in cmdline:
        if arg.startswith("services."):
            return arg.removeprefix("services.")
    return None


@dataclass(frozen=True)
class ProcessSample:
    rss: int  # bytes
    cpu: float  # % of one core since the previous sample
    # % of one core its threads were ready to run and got no CPU (Linux's schedstat): a
    # process slow for want of a CPU, not for its own work. 0 where it is not kept.
    wait: float = 0.0


def cpu_wait_s(pid: int) -> float:
    """Seconds the threads of `pid` have waited for a CPU while ready to run (0 when the
    kernel keeps no count, or the process is gone)."""
    with contextlib.suppress(OSError):
        threads = Path(f"/proc/{pid}/task").iterdir()
        return sum(loop_health.cpu_wait_seconds(t / "schedstat") or 0.0 for t in threads)
    return 0.0


class ProcessTree:
    """Every process under a root (the launcher), each named after what it runs (`actors`,
    `actors#2` for a second one, by order of appearance), with its RSS and CPU share
    between two samples. The same psutil objects are kept from sample to sample, so that
    `cpu_percent` measures the time between them."""

    def __init__(self, root: int, extra: dict[str, int] | None = None) -> None:
        self.root = psutil.Process(root)
        self.extra = dict(extra or {})  # name → pid, outside the tree
        self.labels: dict[int, str] = {}
        self._procs: dict[int, psutil.Process] = {}
        self._taken: dict[str, int] = {}
        self._servers: set[str] = set()
        self._server_procs: dict[int, psutil.Process] = {}
        self._waited: dict[int, tuple[float, float]] = {}  # pid → (when, CPU wait then)

    def add(self, name: str, pid: int) -> None:
        """Also sample `pid` (outside the tree) as `name`; a later one of that name
        replaces it."""
        self.extra[name] = pid

    def add_servers(self, *names: str) -> None:
        """Also sample every process of these programs on the machine (`postgres`, all its
        backends together): shared servers, so their figures include other clients' work."""
        self._servers.update(names)

    def pids(self, name: str) -> list[int]:
        """The running processes named `name` (or `name#n`)."""
        self._discover()
        return [p for p in self._procs if self.labels[p].split("#")[0] == name]

    def sample(self) -> dict[str, ProcessSample]:
        fresh = self._discover()
        out = {}
        now = time.monotonic()
        for pid, proc in list(self._procs.items()):
            try:
                with proc.oneshot():
                    # One just found has no interval to measure its CPU over yet.
                    cpu = 0.0 if pid in fresh else proc.cpu_percent()
                    rss = proc.memory_info().rss
            except psutil.Error:
                del self._procs[pid]  # gone: its label is not given again
                continue
            waited, (then, before) = cpu_wait_s(pid), self._waited.get(pid, (now, 0.0))
            self._waited[pid] = (now, waited)
            wait = 100 * (waited - before) / (now - then) if pid not in fresh and now > then else 0
            out[self.labels[pid]] = ProcessSample(rss, cpu, wait)
        out.update(self._sample_servers())
        return out

    def _sample_servers(self) -> dict[str, ProcessSample]:
        if not self._servers:
            return {}
        for proc in psutil.process_iter(["name"]):
            if proc.info["name"] in self._servers and proc.pid not in self._server_procs:
                self._server_procs[proc.pid] = proc
                with contextlib.suppress(psutil.Error):
                    proc.cpu_percent()
        totals: dict[str, tuple[int, float]] = {}
        for pid, proc in list(self._server_procs.items()):
            try:
                name = proc.info["name"]
                rss, cpu = proc.memory_info().rss, proc.cpu_percent()
            except psutil.Error:
                del self._server_procs[pid]
                continue
            before = totals.get(name, (0, 0.0))
            totals[name] = (before[0] + rss, before[1] + cpu)
        return {f"{name}*": ProcessSample(rss, cpu) for name, (rss, cpu) in totals.items()}

    def _discover(self) -> set[int]:
        """Label the processes not seen before: their pids."""
        known = set(self._procs)
        found: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            found = self.root.children(recursive=True)
        for name, pid in self.extra.items():
            if pid not in self.labels:
                with contextlib.suppress(psutil.Error):
                    self._label(psutil.Process(pid), name, exact=True)
        for proc in found:
            if proc.pid in self.labels:
                continue
            with contextlib.suppress(psutil.Error):
                program = program_name(proc.cmdline())
                if program is not None:
                    self._label(proc, program)
        return set(self._procs) - known

    def _label(self, proc: psutil.Process, name: str, exact: bool = False) -> None:
        """Name it; a second process of a program found in the tree is `name#2` (one that
        was given its name keeps it: the bench's next simulator is `simulator` again)."""
        n = self._taken.get(name, 0) + 1
        self._taken[name] = n
        self.labels[proc.pid] = name if n == 1 or exact else f"{name}#{n}"
        self._procs[proc.pid] = proc
        proc.cpu_percent()  # the first call starts its measure


# --- the bus's consumers -----------------------------------------------------------------

# The actors' durables: `actors` (one consumer of every event, before partitions) and
# `actors-<p>` (one per partition, `libs.bus.actors_durable`): a bench counts both.
ACTORS = "actors"
LAG_STREAMS = (
    subjects.EVENTS_STREAM,
    subjects.COMMANDS_STREAM,
    subjects.SYSTEM_STREAM,
    subjects.DEADLETTER_STREAM,
)


def is_actors(durable: str) -> bool:
    return durable == ACTORS or durable.startswith(ACTORS + "-")


async def consumer_lags(
    js: JetStreamContext, streams: tuple[str, ...] = LAG_STREAMS
) -> dict[str, int]:
    """Every durable consumer's lag (pending + delivered and not acked), by `STREAM/name`."""
    lags = {}
    for stream in streams:
        try:
            infos = await js.consumers_info(stream)
        except NotFoundError:
            continue
        for info in infos:
            if info.config.durable_name:  # not a client's ephemeral reader
                pending = (info.num_pending or 0) + (info.num_ack_pending or 0)
                lags[f"{stream}/{info.name}"] = pending
    return lags


def actors_lag(lags: dict[str, int]) -> int:
    return sum(n for key, n in lags.items() if is_actors(key.partition("/")[2]))


def lag_group(durable: str) -> str:
    """`actors-3` → `actors`, `rules-events-1` → `rules`, `recorder-system` → `recorder`."""
    if is_actors(durable):
        return ACTORS
    return durable.split("-")[0]


async def wait_actors_drained(
    js: JetStreamContext, timeout: float, alive: Callable[[], None] | None = None
) -> None:
    """Until every actors consumer of EVENTS has nothing pending or un-acked."""
    deadline = time.monotonic() + timeout
    seen = "no actors consumer yet"
    while time.monotonic() < deadline:
        if alive is not None:
            alive()
        lags = await consumer_lags(js, (subjects.EVENTS_STREAM,))
        actors = {k: n for k, n in lags.items() if is_actors(k.partition("/")[2])}
        if actors:
            seen = f"{sum(actors.values()):,} pending or un-acked over {len(actors)} consumers"
            if not any(actors.values()):
                return
        await asyncio.sleep(0.05)
    raise BenchError(f"the actors did not drain EVENTS within {timeout:g}s ({seen})")


async def actor_shares(js: JetStreamContext) -> dict[str, int]:
    """How many partitions each actors process holds (by lease owner, `host:pid`); empty
    when the actors are not partitioned (no lease bucket)."""
    try:
        kv = await js.key_value(ACTOR_BUCKET)
        keys = await kv.keys()
    except Exception:  # no bucket, or nats-py's NoKeysError for an empty one
        return {}
    held: dict[str, int] = {}
    for key in keys:
        if key.startswith(ACTORS + "-") and key.removeprefix(ACTORS + "-").isdigit():
            with contextlib.suppress(Exception):  # expired meanwhile
                owner = (await kv.get(key)).value or b""
                held[owner.decode()] = held.get(owner.decode(), 0) + 1
    return held


async def wait_actors_settled(
    js: JetStreamContext, processes: int, timeout: float = 30.0
) -> dict[str, int]:
    """Until `processes` actors processes hold every partition between them, none more
    than its fair share (a joining process takes its share one hand-over at a time).
    Nothing to wait for when the stream is not partitioned (one consumer, one worker)."""
    partitions = bus.stream_partitions(await js.stream_info(subjects.EVENTS_STREAM))
    if partitions is None:
        return {}
    fair = math.ceil(partitions / processes)
    deadline = time.monotonic() + timeout
    held = await actor_shares(js)
    while time.monotonic() < deadline:
        shared = len(held) == processes and sum(held.values()) == partitions
        if shared and max(held.values()) <= fair:
            return held
        await asyncio.sleep(0.1)
        held = await actor_shares(js)
    raise BenchError(f"the actors did not share the partitions within {timeout:g}s: {held}")


async def pause_actors(js: JetStreamContext, seconds: float) -> list[str]:
    """Pause every actors consumer of EVENTS for up to `seconds` (the server holds their
    deliveries; the processes keep their leases): the paused consumers' names."""
    until = datetime.now(UTC) + timedelta(seconds=seconds)
    stamp = until.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    names = [
        info.name
        for info in await js.consumers_info(subjects.EVENTS_STREAM)
        if is_actors(info.name)
    ]
    for name in names:
        await js.pause_consumer(subjects.EVENTS_STREAM, name, stamp)
    return names


async def set_actors_ack_pending(js: JetStreamContext, messages: int) -> None:
    """Let every actors consumer of EVENTS hand out `messages` un-acked (its position kept;
    a running process's next pull asks for what the new limit leaves)."""
    for info in await js.consumers_info(subjects.EVENTS_STREAM):
        if is_actors(info.name) and info.config.max_ack_pending != messages:
            config = dataclasses.replace(info.config, max_ack_pending=messages)
            await js.add_consumer(subjects.EVENTS_STREAM, config)  # an update: it exists


async def resume_consumers(js: JetStreamContext, names: list[str]) -> None:
    for name in names:
        await js.resume_consumer(subjects.EVENTS_STREAM, name)


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (x, y) points (0 for fewer than two)."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


# --- the database ----------------------------------------------------------------------


@dataclass
class Database:
    """A fresh database for this run; `server_url` is set when it must be dropped."""

    url: str
    server_url: str | None = None

    @classmethod
    async def create(cls, given: str | None, data_dir: Path) -> Database:
        if not given:
            return cls(f"sqlite+aiosqlite:///{(data_dir / 'smarthome.db').resolve()}")
        if not given.startswith(("postgres://", "postgresql")):
            raise BenchError("--database-url: only a Postgres server URL is supported")
        server = async_database_url(given)
        name = f"bench_{secrets.token_hex(4)}"
        admin = create_async_engine(server, isolation_level="AUTOCOMMIT")
        try:
            async with admin.connect() as conn:
                await conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            await admin.dispose()
        url = make_url(server).set(database=name).render_as_string(hide_password=False)
        return cls(url, server_url=server)

    @property
    def kind(self) -> str:
        return "Postgres" if self.server_url else "SQLite"

    async def migrate(self) -> None:
        """The schema, by the migrations (blocking: run in a thread)."""
        await asyncio.to_thread(upgrade, self.url)

    async def admin_api_key(self) -> str:
        """An administrator's API key in this database (after `migrate`): every route of the
        HTTP API but the probes wants a principal."""
        engine = make_engine(self.url)
        try:
            return await accounts.issue_api_key(
                make_sessionmaker(engine), "bench", Role.ADMIN, [], "bench"
            )
        finally:
            await engine.dispose()

    async def drop(self) -> None:
        if not self.server_url:
            return
        name = make_url(self.url).database
        admin = create_async_engine(self.server_url, isolation_level="AUTOCOMMIT")
        try:
            async with admin.connect() as conn:
                await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        finally:
            await admin.dispose()


# --- messages --------------------------------------------------------------------------


def attribute_fact(
    device_id: str,
    version: int,
    attributes: dict[str, m.AttributeValue],
    cause_event_id: str,
    at: datetime,
) -> m.DeviceStateFact:
    """The state fact the actors publish for a device's telemetry that changed its
    attributes and nothing else: what a bench fills SYSTEM with."""
    return m.DeviceStateFact(
        device_id=device_id,
        version=version,
        state="active",
        connection="online",
        attributes=attributes,
        last_seen=at,
        changed=["attributes"],
        previous_state="active",
        cause_event_id=cause_event_id,
        cause_type="telemetry",
        correlation_id=None,
        time=at,
    )


# --- measures --------------------------------------------------------------------------


class CauseOnly(msgspec.Struct):
    """The one field of a state fact that the latency match needs."""

    cause_event_id: str


cause_decoder = msgspec.json.Decoder(CauseOnly)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


# --- the table -------------------------------------------------------------------------


@dataclass
class Row:
    figure: str
    value: str
    target: str = "-"
    verdict: str = "-"


@dataclass
class Results:
    header: list[str] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, figure: str, value: str, target: str = "-", ok: bool | None = None) -> None:
        verdict = "-" if ok is None else ("ok" if ok else "miss")
        self.rows.append(Row(figure, value, target, verdict))


def print_table(results: Results) -> None:
    # By figure number; a stable sort keeps each figure's rows in the order they were added.
    rows = sorted(results.rows, key=lambda row: row.figure[:3])
    header = Row("figure", "value", "target", "verdict")
    widths = [
        max(len(getattr(row, col)) for row in [header, *rows])
        for col in ("figure", "value", "target", "verdict")
    ]

    def line(row: Row) -> str:
        return (
            f"{row.figure:<{widths[0]}}  {row.value:>{widths[1]}}  "
            f"{row.target:<{widths[2]}}  {row.verdict}"
        )

    print()
    for note in results.header:
        print(note)
    print()
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))
    print()
    for note in sorted(results.notes, key=lambda note: note[:3]):
        print(note)


# --- the run as a whole ------------------------------------------------------------------


def cancel_on_sigterm() -> None:
    """SIGTERM stops the run like Ctrl-C does: through the caller's tear-down."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)


def run_bench(
    run: Coroutine[Any, Any, object],
    tmp: Path,
    results: Results,
    keep: bool = False,
    show: Callable[[Results], None] = print_table,
    loop: Callable[[Coroutine[Any, Any, object]], object] = asyncio.run,
) -> int:
    """Run a bench in its temporary directory `tmp` and print its table (also what was
    measured before it failed); removes `tmp` unless told to keep it. The exit status."""
    try:
        loop(run)
    except BenchError as exc:
        show(results)  # what was measured before it stopped
        print(f"\nbench: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench: stopped", file=sys.stderr)
        return 130
    finally:
        if keep:
            print(f"bench: logs and data kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    show(results)
    return 0
