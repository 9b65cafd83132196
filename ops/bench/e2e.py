"""End-to-end benchmark of the platform on one machine: prints a table; not a test.

    python ops/bench/e2e.py [--events N] [--devices D] [--database-url URL] [--redis-url URL]
                            [--nats-sync 1s|always|2m] [--actor-processes 1,2,4]
                            [--scale-events 150000] [--scale-rounds 3] [--platform-events 60000]

Everything runs in one go against processes of its own: a nats-server from the wheel on a
free port, a fresh database (SQLite in a temporary directory, or a database
`bench_<random>` created on the given Postgres server and dropped at the end), D registered
devices, and the real services started as `python -m services.actors` and
`python -m services.gateway`. The figures, in the order they are measured:

(a) raw JetStream `publish_async` of N CloudEvents to stream EVENTS (acks awaited): the
    ceiling a Python client reaches on this machine, and the pre-filled stream for (b).
(b) events applied per second by one actors process draining those N events, from the
    moment it is ready (what is pending then) until its consumers (`actors`, or `actors-<p>`
    for each partition) have nothing pending or un-acked; and (b)/(a).
(d) publish → `system.device.<id>.state` latency (p50/p99/max) while events are published
    at a steady rate (1,000/s by default) on an absolute schedule; every event bumps a
    counter attribute, so every event produces a state fact, matched by `cause_event_id`.
(c) `POST /api/v1/events` per second (single events, 16 concurrent clients) with a bearer
    access token, then with an API key (requests per second, p50/p99 of each), then events
    per second in batches of 100. The actors are stopped first, so that the gateway shares
    the two cores only with nats-server and the load generator.
(e) peak RSS of each process (children included), sampled every 100 ms throughout.
(f) sign-in latency (`POST /api/v1/auth/token`, the password checked with Argon2id), one
    request at a time: p50/p99.
(g) scaling: for 1, 2 and 4 actors processes in turn (`--actor-processes`), started together
    and waited on until they share the partitions fairly (their leases in KV); their
    consumers paused while `--scale-events` events over `--scale-devices` devices are
    published, then resumed; events per second from the resume (what is pending then) until
    nothing is, with each process's CPU, the actors' CPU per event and events/s per core,
    how busy the machine was and Postgres's and Redis's CPU, and where each process's
    batches waited (decide, write, transactions). The counts run in turn `--scale-rounds`
    times (3): each count's figure is the median of its rounds, and 2 against 1 the median
    of the rounds' own ratios (this VM's speed drifts by a third between runs minutes apart).
(h) the whole platform against raw: every service of `smarthome up` running (busauth,
    gateway, one actors process, rules, recorder, webhooks), `--platform-events` published at
    full speed on streams purged first (the earlier phases' events are no backlog here);
    applied per second from the first publish until the actors have nothing pending, and
    (h)/(a); when every consumer (the recorder's history) drained too.

Targets (the issues): (b) ≥ 30 % of (a); p99 at 1,000 events/s ≤ 50 ms; every service
≤ 150 MB RSS; sign-in p99 ≤ 300 ms; (g) 2 processes at least 1.4 times one; (h) ≥ 30 % of
(a). A miss is reported in the table; the exit status is 0 whenever the run completed, and
not 0 when it could not (a service failed, a deadline passed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import httpx
import nats
import redis.asyncio as redis
from harness import (
    MB,
    BenchError,
    Child,
    CpuShare,
    MachineShare,
    Results,
    Stage,
    actors_lag,
    cancel_on_sigterm,
    cause_decoder,
    consumer_lags,
    pause_actors,
    percentile,
    resume_consumers,
    run_bench,
    service_env,
    set_actors_ack_pending,
    wait_actors_drained,
    wait_actors_settled,
)
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from libs import accounts, bus, bus_auth, bus_grants, embedded_nats, subjects
from libs import messages as m
from libs.cache import KEY_PREFIX
from libs.db.engine import make_engine, make_sessionmaker
from libs.db.models import Device
from libs.settings import Settings

# The histogram of the time the actors spend on each fetched batch (their /metrics).
ACTORS_BATCH_METRIC = "smarthome_event_apply_seconds"
LATENCY_RATE = 1000.0
LATENCY_SECONDS = 10.0
HTTP_SINGLE = 3000
HTTP_BATCHES = 100
HTTP_BATCH_SIZE = 100
HTTP_CONCURRENCY = 16
HTTP_WARMUP = 100
LOGINS = 50
LOGIN_P99_TARGET_MS = 300.0
SERVICE_RSS_TARGET_MB = 150.0
P99_TARGET_MS = 50.0
RATIO_TARGET = 0.30
SCALE_TWO_TARGET = 1.4  # 2 actors processes against 1, on two cores shared with nats-server


# --- the database ----------------------------------------------------------------------


async def register_devices(database_url: str, device_ids: list[str]) -> None:
    engine = make_engine(database_url)
    try:
        async with make_sessionmaker(engine).begin() as session:
            session.add_all(
                Device(id=d, name=f"bench {d}", kind="sensor", location="bench/floor/room")
                for d in device_ids
            )
    finally:
        await engine.dispose()


async def forget_cached_state(redis_url: str, device_ids: list[str]) -> None:
    """The actors cached these devices' state in the given Redis: remove only those keys."""
    client = redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        for start in range(0, len(device_ids), 500):
            await client.delete(*(KEY_PREFIX + d for d in device_ids[start : start + 500]))
    finally:
        await client.aclose()


# --- events ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Outgoing:
    subject: str
    body: bytes
    event_id: str


def telemetry(device_ids: list[str], first: int, count: int) -> list[Outgoing]:
    """`count` telemetry events round-robin over the devices; a counter that always moves
    makes every event a change, so every event produces a `system.device.<id>.state`."""
    out = []
    for n in range(first, first + count):
        event = m.make_event(
            device_ids[n % len(device_ids)], "telemetry", {"counter": n, "power_w": 60.0}
        )
        out.append(Outgoing(event.nats_subject, m.encode(event), event.id))
    return out


def http_bodies(device_ids: list[str], first: int, requests: int, size: int) -> list[bytes]:
    bodies = []
    for r in range(requests):
        events = telemetry(device_ids, first + r * size, size)
        if size == 1:
            bodies.append(events[0].body)
        else:
            bodies.append(b"[" + b",".join(e.body for e in events) + b"]")
    return bodies


# --- the run ---------------------------------------------------------------------------


async def publish_all(
    js: JetStreamContext, events: Iterable[Outgoing], timeout: float
) -> tuple[int, int]:
    """Publish with `publish_async` and wait for every ack: (acked, failed)."""
    futures = [
        await js.publish_async(e.subject, e.body, headers={bus.MSG_ID: e.event_id}) for e in events
    ]
    acks = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), timeout)
    failed = sum(1 for a in acks if isinstance(a, BaseException))
    return len(acks) - failed, failed


async def wait_drained(js: JetStreamContext, actors: list[Child], timeout: float) -> None:
    """Until every actors consumer (`actors`, or `actors-<p>` for each partition) has
    nothing pending or un-acked (bounded by `timeout`); the events are all published."""

    def alive() -> None:
        for child in actors:
            child.check_alive()

    await wait_actors_drained(js, timeout, alive)


async def stream_messages(js: JetStreamContext, stream: str) -> int:
    return (await js.stream_info(stream)).state.messages


async def scrape(port: int, names: tuple[str, ...]) -> dict[str, float]:
    """The samples `names` (unlabelled) of a service's `/metrics`; {} when it does not answer."""
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            exposition = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    except httpx.HTTPError:
        return {}
    values = {}
    for line in exposition.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            values[name] = float(value)
    return values


@dataclass(frozen=True)
class BatchStats:
    """The actors' own count of fetched batches and the seconds spent handling them."""

    batches: float
    seconds: float

    @classmethod
    async def read(cls, port: int) -> BatchStats | None:
        """From the actors' `/metrics`; None when they do not say (the figure is optional)."""
        values = await scrape(port, (f"{ACTORS_BATCH_METRIC}_count", f"{ACTORS_BATCH_METRIC}_sum"))
        if len(values) != 2:
            return None
        return cls(values[f"{ACTORS_BATCH_METRIC}_count"], values[f"{ACTORS_BATCH_METRIC}_sum"])

    def since(self, before: BatchStats | None, events: int, wall: float) -> str:
        batches = self.batches - (before.batches if before else 0)
        seconds = self.seconds - (before.seconds if before else 0)
        if not batches:
            return "actors: no batch"
        return (
            f"actors: {batches:,.0f} batches, {events / batches:,.0f} events and "
            f"{seconds / batches * 1000:,.0f} ms per batch, handling batches "
            f"{seconds / wall:.0%} of the time"
        )


@dataclass(frozen=True)
class WaitStats:
    """Where an actors process's batches spent their time (its `/metrics`): how many
    batches, the seconds from hand-out to facts stored and write handed over (decide), from
    then to the commit (write), and the group commits."""

    values: dict[str, float]

    METRICS = (
        "smarthome_actor_decide_seconds_count",
        "smarthome_actor_decide_seconds_sum",
        "smarthome_actor_write_seconds_count",
        "smarthome_actor_write_seconds_sum",
        "smarthome_actor_state_transactions_total",
    )

    @classmethod
    async def read(cls, port: int) -> WaitStats:
        return cls(await scrape(port, cls.METRICS))

    def since(self, before: WaitStats) -> str:
        d = {k: v - before.values.get(k, 0.0) for k, v in self.values.items()}
        batches = d.get("smarthome_actor_decide_seconds_count", 0.0)
        writes = d.get("smarthome_actor_write_seconds_count", 0.0)
        if not batches:
            return "no batch"
        decide = d.get("smarthome_actor_decide_seconds_sum", 0.0) / batches * 1000
        write = d.get("smarthome_actor_write_seconds_sum", 0.0) / writes * 1000 if writes else 0
        groups = d.get("smarthome_actor_state_transactions_total", 0.0)
        return (
            f"{batches:,.0f} batches, decide {decide:.1f} ms, write {write:.1f} ms a batch, "
            f"{groups:,.0f} transactions"
        )


@dataclass(frozen=True)
class Posted:
    """What `post_all` saw: the wall time, the answers other than 202, each request's ms."""

    seconds: float
    errors: int
    latencies_ms: list[float]


async def post_all(
    clients: list[httpx.AsyncClient],
    bodies: list[bytes],
    credential: str,
    timeout: float = 120,
) -> Posted:
    """POST every body with `Authorization: Bearer <credential>`, each client sending its
    next one when answered."""
    shared = iter(bodies)  # the clients take the next body in turn
    headers = {"authorization": f"Bearer {credential}"}
    errors = 0
    latencies: list[float] = []

    async def send(client: httpx.AsyncClient) -> None:
        nonlocal errors
        for body in shared:
            sent = time.perf_counter()
            status = (await client.post("", content=body, headers=headers)).status_code
            latencies.append((time.perf_counter() - sent) * 1000)
            if status != 202:
                errors += 1

    started = time.perf_counter()
    async with asyncio.timeout(timeout):
        await asyncio.gather(*(send(c) for c in clients))
    return Posted(time.perf_counter() - started, errors, sorted(latencies))


async def sign_in(client: httpx.AsyncClient, password: str) -> tuple[str, float]:
    """The OAuth2 password grant as `admin`: (access token, ms it took)."""
    started = time.perf_counter()
    response = await client.post(
        "/api/v1/auth/token",
        data={"username": accounts.ADMIN_USERNAME, "password": password, "grant_type": "password"},
    )
    elapsed = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise BenchError(f"sign-in answered {response.status_code}: {response.text[:300]}")
    return str(response.json()["access_token"]), elapsed


class Bench(Stage):
    def __init__(self, args: argparse.Namespace, tmp: Path, results: Results) -> None:
        super().__init__(tmp)
        self.args = args
        self.run_id = secrets.token_hex(3)
        self.device_ids = [f"bench-{self.run_id}-{i:04d}" for i in range(args.devices)]
        # (g) and (h): more devices, so that the 16 partitions get a fair share each.
        self.scale_ids = [f"bench-{self.run_id}-s{i:05d}" for i in range(args.scale_devices)]
        self.results = results
        self.registered = False
        self.next_counter = 0
        self.admin_password = secrets.token_urlsafe(16)
        self.api_key = ""
        self.passwords: dict[str, bus_grants.ServicePassword] = {}

    def counters(self, count: int) -> int:
        first = self.next_counter
        self.next_counter += count
        return first

    # -- set-up and tear-down -------------------------------------------------------------

    async def setup(self) -> JetStreamContext:
        # With the platform's auth on: the services and the bench as their static users.
        auth = "" if self.args.no_bus_auth else bus_auth.embedded_authorization(self.tmp / "bus")
        self.passwords = bus_grants.ensure_service_passwords(self.tmp / "bus")
        nats_url = await self.start_nats_server(self.args.nats_sync, auth=auth, children=True)
        # The load generator itself, without the services it started.
        self.sampler.watch("bench", os.getpid(), rss=False, children=False)
        self.sampler.start()

        self.database = await self.open_database(self.args.database_url)
        await register_devices(self.database.url, self.device_ids + self.scale_ids)
        self.registered = True
        # The HTTP API wants a principal: the user `admin` (for the sign-ins and the access
        # token) and an administrator's API key.
        engine = make_engine(self.database.url)
        try:
            await accounts.ensure_admin(make_sessionmaker(engine), self.admin_password)
        finally:
            await engine.dispose()
        self.api_key = await self.database.admin_api_key()

        self.env = service_env(nats_url, self.database.url, self.tmp / "data", self.args.redis_url)
        # (f) signs in more often than a client address may in a minute.
        self.env["SMARTHOME_LOGINS_PER_MINUTE"] = str(LOGINS * 10)

        self.nc = await nats.connect(
            nats_url, name="bench", user="operator", password=self.passwords["operator"].password,
            inbox_prefix=bus_grants.inbox_prefix("svc", "operator"),
        )  # fmt: skip
        js = self.nc.jetstream()
        await bus.ensure_streams(js)
        return js

    async def teardown(self) -> None:
        await super().teardown()
        if self.args.redis_url and self.registered:
            try:
                await forget_cached_state(self.args.redis_url, self.device_ids + self.scale_ids)
            except Exception as exc:
                print(f"bench: could not remove the cached states from Redis: {exc}")

    def start_service(self, name: str, module: str) -> Child:
        """`python -m module`, waited on until `/health/ready` answers 200."""
        child = self.spawn_service(name, module)
        child.wait_ready(f"http://127.0.0.1:{child.port}/health/ready")
        self.sampler.watch(name, child.pid)
        return child

    def spawn_service(self, name: str, module: str) -> Child:
        """`python -m module` started, not waited on; `actors#2` is a second `actors`
        process (the same bus identity, a port of its own)."""
        port = embedded_nats.free_port()
        env = {**self.env, **bus_grants.service_env(self.passwords, name.split("#")[0])}
        if name == "gateway":
            env["SMARTHOME_HTTP_PORT"] = str(port)
        else:
            env["SMARTHOME_HEALTH_PORT"] = str(port)
        log = self.tmp / f"{name.replace('#', '-')}.log"
        child = Child(name, [sys.executable, "-m", module], env, log, port)
        self.children.append(child)
        return child.spawn()

    async def start_actors(self, count: int) -> list[Child]:
        """`count` actors processes started together, each waited on until ready."""
        names = ["actors", *(f"actors#{n}" for n in range(2, count + 1))]
        actors = [self.spawn_service(name, "services.actors") for name in names]
        for child in actors:
            url = f"http://127.0.0.1:{child.port}/health/ready"
            await asyncio.to_thread(child.wait_ready, url, 60.0)
            self.sampler.watch(child.name, child.pid)
        return actors

    # -- the figures ------------------------------------------------------------------------

    async def run(self) -> None:
        js = await self.setup()
        r = self.results
        db = self.database
        assert db is not None
        r.header.append(
            f"{self.args.events:,} events over {len(self.device_ids)} devices; database "
            f"{db.kind}; cache {'Redis' if self.args.redis_url else 'in-process'}; "
            f"{os.cpu_count()} CPUs; nats-server with JetStream file storage, "
            f"sync_interval {self.args.nats_sync}"
        )
        load_before = os.getloadavg()[0]

        raw_rate = await self.raw_publish(js)
        actors = await asyncio.to_thread(self.start_service, "actors", "services.actors")
        applied_rate = await self.actors_drain(js, actors)
        ratio = applied_rate / raw_rate
        r.add("(b)/(a)", f"{ratio:.0%}", f"≥ {RATIO_TARGET:.0%}", ratio >= RATIO_TARGET)
        await self.latency(js, actors)
        await asyncio.to_thread(actors.stop)  # (c) measures the gateway without them
        await self.gateway()
        if self.args.scale_events:
            await self.scaling(js)
        if self.args.platform_events:
            await self.platform(js, raw_rate)
        for name, peak in self.sampler.peaks.items():
            service = name not in ("nats-server", "bench")
            target = f"≤ {SERVICE_RSS_TARGET_MB:g} MB" if service else "-"
            ok = peak / MB <= SERVICE_RSS_TARGET_MB if service else None
            r.add(f"(e) peak RSS {name}", f"{peak / MB:,.0f} MB", target, ok)
        r.header.append(
            f"load average (1 min) {load_before:.2f} before the run, "
            f"{os.getloadavg()[0]:.2f} after: above ~0.5 before, other work shared the CPUs"
        )

    async def raw_publish(self, js: JetStreamContext) -> float:
        events = telemetry(self.device_ids, self.counters(self.args.events), self.args.events)
        cpu = CpuShare(self.sampler)
        started = time.perf_counter()
        acked, failed = await publish_all(js, events, timeout=120)
        elapsed = time.perf_counter() - started
        if failed:
            raise BenchError(f"(a): {failed} of {len(events)} publishes failed")
        rate = acked / elapsed
        self.results.add("(a) raw JetStream publish_async", f"{rate:,.0f} msgs/s")
        self.results.notes.append(f"(a) {cpu.summary()}")
        return rate

    async def actors_drain(self, js: JetStreamContext, actors: Child) -> float:
        cpu = CpuShare(self.sampler)
        # Ready once it holds its partitions: it may have applied some events by then.
        pending = actors_lag(await consumer_lags(js, (subjects.EVENTS_STREAM,)))
        started = time.perf_counter()
        await wait_drained(js, [actors], timeout=max(60.0, self.args.events / 200))
        elapsed = time.perf_counter() - started
        if pending < self.args.events:
            self.results.notes.append(
                f"(b) {self.args.events - pending:,} of the {self.args.events:,} events were "
                "applied before the actors answered ready: the rate is of the others"
            )
        self.results.notes.append(f"(b) {cpu.summary()}")
        after = await BatchStats.read(actors.port)
        if after:
            # All their batches so far: these were the only events they had.
            self.results.notes.append(f"(b) {after.since(None, self.args.events, elapsed)}")
        rate = pending / elapsed
        self.results.add(
            "(b) events applied by one actors process",
            f"{rate:,.0f} events/s",
            f"≥ {RATIO_TARGET:.0%} of (a)",
        )
        facts = await stream_messages(js, subjects.SYSTEM_STREAM)
        dead = await stream_messages(js, subjects.DEADLETTER_STREAM)
        if facts != self.args.events or dead:
            self.results.notes.append(
                f"(b): {facts:,} state facts for {self.args.events:,} events, "
                f"{dead} dead letters (expected one fact per event, none dead)"
            )
        return rate

    async def latency(self, js: JetStreamContext, actors: Child) -> None:
        assert self.nc is not None
        count = int(LATENCY_RATE * LATENCY_SECONDS)
        events = telemetry(self.device_ids, self.counters(count), count)
        sent: dict[str, float] = {}
        received: dict[str, float] = {}
        expected = {e.event_id for e in events}
        all_in = asyncio.Event()

        async def on_fact(msg: Msg) -> None:
            at = time.perf_counter()
            cause = cause_decoder.decode(msg.data).cause_event_id
            if cause in expected and cause not in received:
                received[cause] = at
                if len(received) == len(expected):
                    all_in.set()

        sub = await self.nc.subscribe(subjects.DEVICE_STATES_ALL, cb=on_fact)
        await self.nc.flush()
        futures = []
        cpu = CpuShare(self.sampler)
        stats = await BatchStats.read(actors.port)
        try:
            begin = time.perf_counter() + 0.05
            for i, e in enumerate(events):
                # An absolute schedule: a late tick is followed by a burst, not by drift.
                delay = begin + i / LATENCY_RATE - time.perf_counter()
                await asyncio.sleep(max(delay, 0))
                sent[e.event_id] = time.perf_counter()
                futures.append(
                    await js.publish_async(e.subject, e.body, headers={bus.MSG_ID: e.event_id})
                )
            span = time.perf_counter() - begin
            acks = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 30)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_in.wait(), 15)
            wall = time.perf_counter() - begin
        finally:
            await sub.unsubscribe()
        self.results.notes.append(f"(d) {cpu.summary()}")
        after = await BatchStats.read(actors.port)
        if after:
            self.results.notes.append(f"(d) {after.since(stats, len(sent), wall)}")
        failed = sum(1 for a in acks if isinstance(a, BaseException))
        # In publishing order: (when published, latency in ms).
        timeline = [(t, (received[i] - t) * 1000) for i, t in sent.items() if i in received]
        latencies = sorted(latency for _, latency in timeline)
        missing = len(sent) - len(latencies)
        if not latencies:
            raise BenchError("(d): no state fact arrived")
        rate = f"{len(sent) / span:,.0f}/s"
        p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
        r = self.results
        r.add(f"(d) latency p50 at {rate}", f"{p50:.1f} ms")
        target = f"≤ {P99_TARGET_MS:g} ms"
        r.add(f"(d) latency p99 at {rate}", f"{p99:.1f} ms", target, p99 <= P99_TARGET_MS)
        r.add(f"(d) latency max at {rate}", f"{latencies[-1]:.1f} ms")
        first = sorted(lat for t, lat in timeline if t < begin + 1)
        last = sorted(lat for t, lat in timeline if t >= begin + span - 1)
        if first and last:
            p50_first, p50_last = percentile(first, 50), percentile(last, 50)
            trend = (
                ": a backlog grew, the actors applied fewer events per second than were published"
                if p50_last > 2 * p50_first + 20
                else ""
            )
            r.notes.append(
                f"(d) p50 of the events published in the first second {p50_first:,.0f} ms, "
                f"in the last second {p50_last:,.0f} ms{trend}"
            )
        if missing or failed:
            r.notes.append(
                f"(d): {missing} of {len(sent):,} events had no state fact within 15 s; "
                f"{failed} publishes failed"
            )

    async def gateway(self) -> None:
        gateway = await asyncio.to_thread(self.start_service, "gateway", "services.gateway")
        base = f"http://127.0.0.1:{gateway.port}"
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            access_token = await self.sign_ins(client)
        url = f"{base}/api/v1/events"
        # One client of one connection per simulated user: a shared pool of 16 connections
        # makes httpx poll every pooled socket on each request, and the load generator
        # would spend on that the CPU it shares with the gateway.
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(
                    httpx.AsyncClient(
                        base_url=url,
                        headers={"content-type": "application/json"},
                        limits=httpx.Limits(max_connections=1),
                        timeout=30,
                    )
                )
                for _ in range(HTTP_CONCURRENCY)
            ]
            devices = self.device_ids
            errors: dict[str, int] = {}
            for credential in (access_token, self.api_key):
                warmup = http_bodies(devices, self.counters(HTTP_WARMUP), HTTP_WARMUP, 1)
                await post_all(clients, warmup, credential)

            for name, credential in (("access token", access_token), ("API key", self.api_key)):
                singles = http_bodies(devices, self.counters(HTTP_SINGLE), HTTP_SINGLE, 1)
                cpu = CpuShare(self.sampler)
                posted = await post_all(clients, singles, credential)
                self.results.notes.append(f"(c) single events, {name}: {cpu.summary()}")
                figure = f"(c) POST /api/v1/events, 1 event, {HTTP_CONCURRENCY} clients, {name}"
                self.results.add(figure, f"{HTTP_SINGLE / posted.seconds:,.0f} req/s")
                p50 = percentile(posted.latencies_ms, 50)
                p99 = percentile(posted.latencies_ms, 99)
                self.results.add(f"{figure}: p50 / p99", f"{p50:.1f} / {p99:.1f} ms")
                errors[f"single ({name})"] = posted.errors

            batched_count = HTTP_BATCHES * HTTP_BATCH_SIZE
            batches = http_bodies(
                devices, self.counters(batched_count), HTTP_BATCHES, HTTP_BATCH_SIZE
            )
            cpu = CpuShare(self.sampler)
            posted = await post_all(clients, batches, self.api_key)
            self.results.notes.append(f"(c) batches: {cpu.summary()}")
            self.results.add(
                f"(c) POST /api/v1/events, {HTTP_BATCH_SIZE} per request, "
                f"{HTTP_CONCURRENCY} clients, API key",
                f"{batched_count / posted.seconds:,.0f} events/s",
            )
            errors["batched"] = posted.errors
            if any(errors.values()):
                refused = ", ".join(f"{n} {kind}" for kind, n in errors.items() if n)
                self.results.notes.append(f"(c): requests not answered 202: {refused}")

    async def scaling(self, js: JetStreamContext) -> None:
        """(g) N events drained by 1, 2, 4 actors processes, `--scale-rounds` times in
        turn: each count's rate is the median of its rounds, and 2 against 1 the median of
        each round's ratio (its two drains a minute apart: a drift of the machine's speed
        between runs, 30 % and more on this VM, cancels out). With more than one
        `--ack-pending-batches`, each is drained in turn within every round (an A/B on the
        same machine in the same minutes) and reported apart."""
        settings = self.args.ack_pending_batches
        told = {b: f", {b} batches un-acked" if len(settings) > 1 else "" for b in settings}
        rates: dict[tuple[int, int], list[float]] = {
            (b, count): [] for b in settings for count in self.args.actor_processes
        }
        for round_no in range(1, self.args.scale_rounds + 1):
            for batches in settings:
                await set_actors_ack_pending(js, batches * bus.ACTORS_BATCH)
                for count in self.args.actor_processes:
                    rate, note = await self.scale_drain(js, count)
                    rates[batches, count].append(rate)
                    self.results.notes.append(
                        f"(g) round {round_no}{told[batches]}, {count} actors {note}"
                    )
        for batches in settings:
            by_count = {c: r for (b, c), r in rates.items() if b == batches}
            self.report_scaling(by_count, told[batches])

    def report_scaling(self, rates: dict[int, list[float]], told: str) -> None:
        one = statistics.median(rates[1]) if rates.get(1) else None
        for count, measured in rates.items():
            rate = statistics.median(measured)
            times = f"; {rate / one:.2f}x one" if one and count > 1 else ""
            target, ok = "-", None
            if count == 2 and rates.get(1):
                ratios = [two / single for two, single in zip(measured, rates[1], strict=True)]
                ratio = statistics.median(ratios)
                times = f"; {ratio:.2f}x one (rounds: {', '.join(f'{r:.2f}' for r in ratios)})"
                target, ok = f"≥ {SCALE_TWO_TARGET:g}x one", ratio >= SCALE_TWO_TARGET
            rounds = f" (median of {len(measured)})" if len(measured) > 1 else ""
            self.results.add(
                f"(g) drain by {count} actors processes{told}{rounds}",
                f"{rate:,.0f} events/s{times}",
                target,
                ok,
            )

    async def scale_drain(self, js: JetStreamContext, count: int) -> tuple[float, str]:
        """`count` actors processes started together and left to share the partitions,
        their consumers paused while the N are published, then resumed; measured from then
        (what is pending) until nothing is."""
        actors = await self.start_actors(count)
        try:
            began = time.perf_counter()
            held = await wait_actors_settled(js, count, timeout=60)
            settled = time.perf_counter() - began
            n = self.args.scale_events
            paused = await pause_actors(js, seconds=600)
            try:
                await publish_all(js, telemetry(self.scale_ids, self.counters(n), n), 300)
            finally:
                await resume_consumers(js, paused)
            rate, note = await self.timed_drain(js, actors)
        finally:
            for child in actors:
                await asyncio.to_thread(child.stop)
        shares = "/".join(str(n) for n in sorted(held.values())) if held else "one consumer"
        return rate, (
            f"(partitions {shares}, shared {settled:.1f} s after all were ready): "
            f"{rate:,.0f} events/s; {note}"
        )

    async def timed_drain(self, js: JetStreamContext, actors: list[Child]) -> tuple[float, str]:
        """Events applied per second from now (what is pending now) until nothing is; and
        a note with each process's CPU."""
        pending = actors_lag(await consumer_lags(js, (subjects.EVENTS_STREAM,)))
        before = self.sampler.cpu_seconds()
        machine = MachineShare()
        waits = {a.name: await WaitStats.read(a.port) for a in actors}
        began = time.perf_counter()
        await wait_drained(js, actors, timeout=max(120.0, pending / 200))
        wall = time.perf_counter() - began
        waited = "; ".join(
            [f"{a.name}: {(await WaitStats.read(a.port)).since(waits[a.name])}" for a in actors]
        )
        after = self.sampler.cpu_seconds()
        shares = {
            name: (after[name] - before.get(name, 0.0)) / wall
            for name in after
            if name == "nats-server" or name.split("#")[0] == "actors"
        }
        actors_cpu = sum(v for k, v in shares.items() if k != "nats-server")
        rate = pending / wall if wall else 0.0
        per_event_ms = actors_cpu * wall / pending * 1000 if pending else 0.0
        cpu = ", ".join(f"{k} {v:.0%}" for k, v in shares.items())
        note = (
            f"{pending:,} pending when their consumers resumed, drained in {wall:.2f} s; "
            f"CPU (% of one core): {cpu}; actors CPU {per_event_ms:.3f} ms per event, "
            f"{rate / actors_cpu if actors_cpu else 0:,.0f} events/s per actors core; "
            f"{machine.summary()}; load average {os.getloadavg()[0]:.2f}; {waited}"
        )
        return rate, note

    async def platform(self, js: JetStreamContext, raw_rate: float) -> None:
        """(h) every service of `smarthome up` running; N events published with
        `publish_async` at full speed: applied per second, from the first publish until the
        actors have nothing pending; against (a), on the same server in this run. The
        streams are purged first: the recorder and the rules start here, and the earlier
        phases' half a million events would otherwise be their backlog, recorded beside
        (h)'s own on the same two cores."""
        for stream in (subjects.EVENTS_STREAM, subjects.SYSTEM_STREAM, subjects.COMMANDS_STREAM):
            await js.purge_stream(stream)
        for name in ("busauth", "rules", "recorder", "webhooks"):
            await asyncio.to_thread(self.start_service, name, f"services.{name}")
        actors = await self.start_actors(1)
        n = self.args.platform_events
        events = telemetry(self.scale_ids, self.counters(n), n)
        cpu = CpuShare(self.sampler)
        began = time.perf_counter()
        acked, failed = await publish_all(js, events, timeout=300)
        published = time.perf_counter() - began
        await wait_drained(js, actors, timeout=max(120.0, n / 200))
        applied = time.perf_counter() - began
        everything = await self.all_drained(js, timeout=max(120.0, n / 100))
        rate = n / applied
        ratio = rate / raw_rate
        r = self.results
        r.add(
            f"(h) applied with every service running ({n:,} published at full speed)",
            f"{rate:,.0f} events/s",
        )
        r.add("(h)/(a)", f"{ratio:.0%}", f"≥ {RATIO_TARGET:.0%}", ratio >= RATIO_TARGET)
        r.notes.append(
            f"(h) published in {published:.2f} s ({acked / published:,.0f}/s, {failed} failed), "
            f"applied by the actors {applied:.2f} s after the first publish; every consumer "
            f"(recorder: history of the events, audit of the transitions; rules: the facts "
            f"and events their rules read) drained after "
            f"{everything + applied:.2f} s; {cpu.summary()}; load average "
            f"{os.getloadavg()[0]:.2f}"
        )

    async def all_drained(self, js: JetStreamContext, timeout: float) -> float:
        """Seconds until no durable of any stream has anything pending or un-acked."""
        began = time.perf_counter()
        while time.perf_counter() - began < timeout:
            if not any((await consumer_lags(js)).values()):
                return time.perf_counter() - began
            await asyncio.sleep(0.1)
        raise BenchError(f"(h): the consumers did not drain within {timeout:g}s")

    async def sign_ins(self, client: httpx.AsyncClient) -> str:
        """(f): LOGINS sign-ins one after the other; the last one's access token."""
        token, _ = await sign_in(client, self.admin_password)  # warm-up
        times = []
        for _ in range(LOGINS):
            token, ms = await sign_in(client, self.admin_password)
            times.append(ms)
        times.sort()
        p99 = percentile(times, 99)
        self.results.add(
            f"(f) sign-in POST /api/v1/auth/token (Argon2id), {LOGINS} in a row: p50 / p99",
            f"{percentile(times, 50):.1f} / {p99:.1f} ms",
            f"p99 ≤ {LOGIN_P99_TARGET_MS:g} ms",
            p99 <= LOGIN_P99_TARGET_MS,
        )
        return token


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000, help="events for (a) and (b)")
    parser.add_argument("--devices", type=int, default=100, help="registered devices")
    parser.add_argument(
        "--database-url",
        help="a Postgres server: the run creates a database bench_<random> there and drops it",
    )
    parser.add_argument("--redis-url", help="Redis for the hot state (default in-process)")
    parser.add_argument(
        "--nats-sync",
        default=Settings.nats_sync,
        help=f"JetStream sync_interval: the platform's default ({Settings.nats_sync}), "
        "'always' or e.g. '2m'",
    )
    parser.add_argument(
        "--no-bus-auth",
        action="store_true",
        help="nats-server without its authorization (before issue 12), to compare",
    )
    parser.add_argument(
        "--actor-processes",
        type=lambda v: [int(n) for n in v.split(",")],
        default=[1, 2, 4],
        help="(g): the actors processes of each drain, e.g. 1,2,4",
    )
    parser.add_argument(
        "--scale-events", type=int, default=150_000, help="(g): events of each drain; 0: no (g)"
    )
    parser.add_argument(
        "--scale-rounds",
        type=int,
        default=3,
        help="(g): the drains of every count, in turn, this many times (medians reported)",
    )
    parser.add_argument(
        "--ack-pending-batches",
        type=lambda v: [int(n) for n in v.split(",")],
        default=[2],
        help="(g): the batches each actors consumer may have un-acked (the platform's: 2); "
        "e.g. 2,3 drains each in turn, every round",
    )
    parser.add_argument(
        "--platform-events", type=int, default=60_000, help="(h): events published; 0: no (h)"
    )
    parser.add_argument("--scale-devices", type=int, default=1000, help="(g) and (h)")
    args = parser.parse_args(argv)
    if args.events < 1 or args.devices < 1:
        parser.error("--events and --devices must be at least 1")
    return args


async def amain(args: argparse.Namespace, tmp: Path, results: Results) -> None:
    bench = Bench(args, tmp, results)
    cancel_on_sigterm()
    try:
        await bench.run()
    finally:
        await bench.teardown()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="smarthome-bench-"))
    results = Results()
    return run_bench(amain(args, tmp, results), tmp, results)


if __name__ == "__main__":
    sys.exit(main())
