"""Benchmark of the recorder on one machine: prints a table; not a test.

    python ops/bench/recorder.py [--events 20000] [--devices 1000] [--database-url URL]
                                 [--nats-sync 1s|always|2m] [--no-facts] [--profile PATH]
                                 [--rate 1000] [--seconds 10]

Everything runs against processes of its own: a nats-server from the wheel on a free port
and a fresh database (SQLite in a temporary directory, or a database `bench_<random>`
created on the given Postgres server and dropped at the end). The streams and the
recorder's durable consumers are provisioned as the gateway does, and the recorder's
consumers paused; then the streams are pre-filled as the platform would fill them: N
telemetry events round-robin over D devices on `events.<device>.telemetry` (CloudEvents,
their id as `Nats-Msg-Id`), and, unless `--no-facts`, the N state facts the actors publish
for them on `system.device.<device>.state` (attribute changes: no audit row, decoded and
skipped). The figures, in the order they are measured:

(1) raw pull + ack: a scratch durable consumer with the recorder's settings on each stream
    (AckPolicy.ALL, from the first message), read as the consumer runtime reads
    (`libs.pull.Puller`, the recorder's batch) with one ack per batch, in this process: the
    ceiling for any consumer of those messages on this machine, and the baseline.
(2) the recorder (`python -m services.recorder`, started and ready before its consumer on
    EVENTS is resumed) drains the events: wall time, events/s and (2)/(1), CPU seconds per
    1,000 events (the process's user + system time, from psutil, over the drain), batches
    written and their p50/p99 write time (commit included; from the recorder's histogram
    `smarthome_recorder_batch_seconds`, interpolated within its buckets, as Prometheus'
    histogram_quantile does) and the mean (exact: its sum over its count). Every event must
    be in the history table afterwards, once.
(3) the same for the state facts on SYSTEM (its consumer resumed once the events are in).
(4) peak RSS of the recorder and of nats-server, sampled every 100 ms.
(5) live traffic: events (each followed by its state fact, unless `--no-facts`) published
    at a steady `--rate` (1,000/s) on an absolute schedule for `--seconds` (10), as devices
    and the actors would: the recorder's share of a core and its CPU seconds per 1,000
    events (their facts included) while it keeps up, and the size of its batches. Batches
    are small at a steady rate, so what a batch costs whatever its size shows here. The
    baseline: a process running the consumer runtime alone (`libs.consumer`, batching as
    the recorder does, a handler that does nothing) on durables of its own over the same
    messages at the same time: what receiving and acking them costs any worker.

`--profile PATH` runs the recorder under cProfile (timed by CPU time) and writes its profile
to PATH when it stops (the CPU figures then include the profiler's own cost). The exit status is 0
whenever the run completed, and not 0 when it could not (the recorder died, a deadline
passed, a row was missing).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from harness import (
    MB,
    BenchError,
    Child,
    Results,
    Stage,
    attribute_fact,
    run_bench,
    service_env,
)
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from sqlalchemy import func, select

from libs import bus, subjects
from libs import messages as m
from libs.db.engine import make_engine, make_sessionmaker
from libs.db.models import HistoryEntry
from libs.pull import Puller
from libs.settings import Settings

RAW_DURABLE = "bench-raw"
BATCH_METRIC = "smarthome_recorder_batch_seconds"
PAUSED_UNTIL = "2999-01-01T00:00:00Z"
POLL_S = 0.02
FLOOR_DURABLE = "bench-floor"
# The consumer runtime alone, batching as the recorder does, handling nothing: what receiving,
# batching and acking the messages costs any worker, whatever it does with them.
FLOOR = """
import asyncio, sys
import nats
from libs import runtime
from libs.consumer import Consumer
from nats.js.api import ConsumerConfig
from services.recorder.writer import BATCH, LINGER_S

async def nothing(items):
    return None

async def main(url, durable, streams):
    nc = await nats.connect(url, name="bench-floor")
    js = nc.jetstream()
    stop = asyncio.Event()
    consumers = []
    for stream in streams:
        info = await js.consumer_info(stream, durable)
        consumers.append(
            Consumer(nc, stream, info.config, lambda d: d, nothing, batch=BATCH, linger=LINGER_S)
        )
    tasks = [asyncio.ensure_future(c.run(stop)) for c in consumers]
    for c in consumers:
        await c.bound.wait()
    print("floor ready", flush=True)
    await asyncio.gather(*tasks)

runtime.run_loop(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
"""
# `python -m services.recorder` under cProfile timed by CPU, not by the wall clock (which
# would count the waits on the bus and the database), its profile written when it stops.
PROFILED = """
import cProfile, runpy, sys, time
profile = cProfile.Profile(time.process_time)
path, sys.argv = sys.argv[1], ["services.recorder"]
profile.enable()
try:
    runpy.run_module("services.recorder", run_name="__main__", alter_sys=True)
finally:
    profile.disable()
    profile.dump_stats(path)
"""


# --- messages --------------------------------------------------------------------------


@dataclass(frozen=True)
class Outgoing:
    subject: str
    body: bytes
    msg_id: str


def telemetry(device_ids: list[str], count: int) -> list[Outgoing]:
    """`count` telemetry events round-robin over the devices, as a meter sends them."""
    out = []
    for n in range(count):
        data = {"power_w": 20.0 + n % 40, "energy_wh": n // len(device_ids), "on": True}
        event = m.make_event(device_ids[n % len(device_ids)], "telemetry", data)
        out.append(Outgoing(event.nats_subject, m.encode(event), event.id))
    return out


def state_facts(device_ids: list[str], run_id: str, count: int) -> list[Outgoing]:
    """The facts the actors publish for those events: an attribute changed, nothing else.
    Their message ids are this run's own (not the actors' `state:<id>:<version>`)."""
    at = m.now()
    size = len(device_ids)
    out = []
    for n in range(count):
        device = device_ids[n % size]
        attributes: dict[str, m.AttributeValue] = {
            "power_w": 20.0 + n % 40,
            "energy_wh": n // size,
            "on": True,
        }
        fact = attribute_fact(device, n // size + 1, attributes, f"bench-{run_id}-{n}", at)
        out.append(Outgoing(subjects.device_state(device), m.encode(fact), f"bench:{run_id}:{n}"))
    return out


async def publish_all(js: JetStreamContext, messages: list[Outgoing]) -> float:
    """Publish with `publish_async`, wait for every ack; messages per second."""
    started = time.perf_counter()
    futures = [
        await js.publish_async(o.subject, o.body, headers={bus.MSG_ID: o.msg_id}) for o in messages
    ]
    acks = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 300)
    failed = sum(1 for a in acks if isinstance(a, BaseException))
    if failed:
        raise BenchError(f"{failed} of {len(messages)} publishes failed")
    return len(messages) / (time.perf_counter() - started)


# --- the recorder's histogram ------------------------------------------------------------


@dataclass(frozen=True)
class Histogram:
    """One label set of a Prometheus histogram: cumulative counts by upper bound."""

    buckets: list[tuple[float, float]]
    count: float
    total: float

    @classmethod
    def parse(cls, exposition: str, name: str, stream: str) -> Histogram:
        label = f'stream="{stream}"'
        buckets: list[tuple[float, float]] = []
        count = total = 0.0
        for line in exposition.splitlines():
            if label not in line:
                continue
            key, _, value = line.rpartition(" ")
            if key.startswith(f"{name}_bucket{{"):
                bound = key.split('le="', 1)[1].split('"', 1)[0]
                buckets.append((float(bound), float(value)))
            elif key.startswith(f"{name}_count{{"):
                count = float(value)
            elif key.startswith(f"{name}_sum{{"):
                total = float(value)
        return cls(sorted(buckets), count, total)

    def minus(self, before: Histogram) -> Histogram:
        earlier = dict(before.buckets)
        return Histogram(
            [(le, n - earlier.get(le, 0.0)) for le, n in self.buckets],
            self.count - before.count,
            self.total - before.total,
        )

    def quantile(self, q: float) -> float:
        """As `histogram_quantile`: linear within the bucket the rank falls in."""
        rank = q * self.count
        lower, below = 0.0, 0.0
        for le, cumulative in self.buckets:
            if cumulative >= rank:
                if le == float("inf"):
                    return lower
                inside = cumulative - below
                return lower + (le - lower) * ((rank - below) / inside if inside else 0.0)
            lower, below = le, cumulative
        return lower


async def scrape(port: int, stream: str) -> Histogram:
    async with httpx.AsyncClient(timeout=5) as client:
        exposition = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    return Histogram.parse(exposition, BATCH_METRIC, stream)


# --- the run ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One stream the recorder reads, as this run fills it."""

    stream: str
    what: str  # what its messages are, in the table
    count: int
    last_seq: int

    @property
    def durable(self) -> str:
        return bus.recorder_durable(self.stream)


class Bench(Stage):
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        super().__init__(tmp, stop_grace=60.0)  # a profile takes a while to write
        self.args = args
        self.run_id = secrets.token_hex(3)
        self.device_ids = [f"rec-{self.run_id}-{i:05d}" for i in range(args.devices)]
        self.results = Results()

    # -- set-up -------------------------------------------------------------------------

    async def setup(self) -> JetStreamContext:
        nats_url = await self.start_nats_server(self.args.nats_sync)
        self.sampler.start()
        database = await self.open_database(self.args.database_url)
        self.env = service_env(nats_url, database.url, self.tmp / "data", None)
        js = await self.connect(nats_url)  # the recorder's consumers with the streams
        for stream in bus.RECORDER_SOURCES:
            await js.pause_consumer(stream, bus.recorder_durable(stream), PAUSED_UNTIL)
        return js

    async def start_recorder(self) -> tuple[Child, int]:
        argv = [sys.executable, "-m", "services.recorder"]
        if self.args.profile:
            argv = [sys.executable, "-c", PROFILED, self.args.profile]
        child = self.spawn_child("recorder", argv)
        await self.wait_ready(child, child.port, 60.0)
        return child, child.port

    # -- the figures ------------------------------------------------------------------------

    async def run(self) -> Results:
        js = await self.setup()
        db = self.database
        assert db is not None
        r = self.results
        a = self.args
        r.header.append(
            f"{a.events:,} events over {a.devices:,} devices"
            f"{'' if a.no_facts else f', and their {a.events:,} state facts'}; "
            f"database {db.kind}; batch {bus.RECORDER_BATCH}; {os.cpu_count()} CPUs; "
            f"nats-server with JetStream file storage, sync_interval {a.nats_sync}"
        )
        load_before = os.getloadavg()[0]

        sources = [await self.fill(js, subjects.EVENTS_STREAM, "events")]
        if not a.no_facts:
            sources.append(await self.fill(js, subjects.SYSTEM_STREAM, "state facts"))
        raw = {s.stream: await self.raw_pull(js, s) for s in sources}
        recorder, port = await self.start_recorder()
        for number, source in enumerate(sources, start=2):
            await self.drain(js, recorder, port, source, raw[source.stream], f"({number})")
        if a.seconds > 0:
            await self.live(js, recorder, port, sources)
        await self.check_history(a.events + int(a.rate * a.seconds))
        for name, peak in self.sampler.peaks.items():
            r.add(f"(4) peak RSS {name}", f"{peak / MB:,.0f} MB")
        r.header.append(
            f"load average (1 min) {load_before:.2f} before the run, "
            f"{os.getloadavg()[0]:.2f} after: above ~0.5 before, other work shared the CPUs"
        )
        if a.profile:
            await asyncio.to_thread(recorder.stop, 60.0)
            r.notes.append(f"(2) profile of the recorder (cProfile) in {a.profile}")
        return r

    async def fill(self, js: JetStreamContext, stream: str, what: str) -> Source:
        count = self.args.events
        if stream == subjects.EVENTS_STREAM:
            messages = telemetry(self.device_ids, count)
        else:
            messages = state_facts(self.device_ids, self.run_id, count)
        rate = await publish_all(js, messages)
        self.results.notes.append(
            f"(1) {count:,} {what} published to {stream} with publish_async at {rate:,.0f} msgs/s"
        )
        last_seq = (await js.stream_info(stream)).state.last_seq
        return Source(stream, what, count, last_seq)

    async def raw_pull(self, js: JetStreamContext, source: Source) -> float:
        """(1): pull + ack every message of the source's filter from a scratch durable with
        the recorder's settings, in this process."""
        config = next(
            c for s, c in bus.CONSUMERS if s == source.stream and c.durable_name == source.durable
        )
        await js.add_consumer(source.stream, dataclasses.replace(config, durable_name=RAW_DURABLE))
        assert self.nc is not None
        puller = Puller(self.nc, source.stream, RAW_DURABLE)
        await puller.start()
        got = 0
        deadline = time.monotonic() + 120
        try:
            cpu = time.process_time()
            started = time.perf_counter()
            while got < source.count and time.monotonic() < deadline:
                msgs = await puller.fetch(bus.RECORDER_BATCH, timeout=1.0)
                if msgs:
                    await msgs[-1].ack()  # AckPolicy.ALL: the batch
                got += len(msgs)
            await self.nc.flush()  # every ack has reached the server
            elapsed = time.perf_counter() - started
            cpu = time.process_time() - cpu
        finally:
            await puller.stop()
            await js.delete_consumer(source.stream, RAW_DURABLE)
        if got < source.count:
            raise BenchError(f"(1): pulled {got} of {source.count} {source.what} within 120 s")
        rate = got / elapsed
        self.results.add(
            f"(1) raw pull + ack per batch, {source.what}",
            f"{rate:,.0f} msgs/s, {cpu / got * 1000:.3f} CPU s per 1,000",
        )
        return rate

    async def drain(
        self,
        js: JetStreamContext,
        recorder: Child,
        port: int,
        source: Source,
        raw_rate: float,
        figure: str,
    ) -> None:
        """Resume the recorder's consumer of the source; time it until all is acked."""
        before = await scrape(port, source.stream)
        cpu_before = self.sampler.cpu_seconds()["recorder"]
        started = time.perf_counter()
        await js.resume_consumer(source.stream, source.durable)
        await self.wait_acked(js, recorder, source, timeout=max(120.0, source.count / 100))
        elapsed = time.perf_counter() - started
        cpu = self.sampler.cpu_seconds()["recorder"] - cpu_before
        batches = (await scrape(port, source.stream)).minus(before)

        r = self.results
        what = source.what
        rate = source.count / elapsed
        r.add(f"{figure} recorder drain of {source.count:,} {what}", f"{elapsed:.2f} s")
        r.add(f"{figure} {what} recorded per second", f"{rate:,.0f}/s")
        r.add(f"{figure} ÷ (1) raw pull", f"{rate / raw_rate:.0%}")
        r.add(f"{figure} recorder CPU per 1,000 {what}", f"{cpu / source.count * 1000:.3f} s")
        r.add(f"{figure} recorder CPU over the drain", f"{cpu / elapsed:.0%} of one core")
        if batches.count:
            p50, p99 = batches.quantile(0.50) * 1000, batches.quantile(0.99) * 1000
            mean = batches.total / batches.count * 1000
            r.add(
                f"{figure} batch write p50 / p99 / mean",
                f"{p50:.1f} / {p99:.1f} / {mean:.1f} ms",
            )
            r.add(
                f"{figure} batches written, {what} per batch",
                f"{batches.count:,.0f}, {source.count / batches.count:,.0f}",
            )
            r.notes.append(
                f"{figure} writing batches took {batches.total / elapsed:.0%} of the drain's "
                "wall time (the rest: fetching, decoding, acking, waiting)"
            )

    async def live(
        self, js: JetStreamContext, recorder: Child, port: int, sources: list[Source]
    ) -> None:
        """(5): publish at a steady rate, then wait until the recorder acked it all."""
        a = self.args
        count = int(a.rate * a.seconds)
        events = telemetry(self.device_ids, count)
        facts = state_facts(self.device_ids, f"{self.run_id}-live", count) if sources[1:] else []
        floor = await self.start_floor(js, sources)
        before = {s.stream: await scrape(port, s.stream) for s in sources}
        cpu_before = self.sampler.cpu_seconds()
        futures = []
        begin = time.perf_counter() + 0.05
        for i, event in enumerate(events):
            # An absolute schedule: a late tick is followed by a burst, not by drift.
            await asyncio.sleep(max(begin + i / a.rate - time.perf_counter(), 0))
            for o in (event, facts[i]) if facts else (event,):
                futures.append(
                    await js.publish_async(o.subject, o.body, headers={bus.MSG_ID: o.msg_id})
                )
        acks = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 60)
        if any(isinstance(ack, BaseException) for ack in acks):
            raise BenchError("(5): publishes failed")
        for source in sources:
            last_seq = (await js.stream_info(source.stream)).state.last_seq
            grown = dataclasses.replace(source, last_seq=last_seq)
            await self.wait_acked(js, recorder, grown, timeout=60)
            await self.wait_acked(js, floor, grown, timeout=60, durable=FLOOR_DURABLE)
        wall = time.perf_counter() - begin
        after = self.sampler.cpu_seconds()
        cpu = after["recorder"] - cpu_before["recorder"]
        floor_cpu = after["floor"] - cpu_before["floor"]
        r = self.results
        label = f"(5) live {a.rate:,.0f} events/s{' + facts' if facts else ''}, {a.seconds:g} s"
        r.add(f"{label}: recorder CPU", f"{cpu / wall:.0%} of one core")
        r.add(f"{label}: CPU per 1,000 events", f"{cpu / count * 1000:.3f} s")
        r.add(
            f"{label}: the runtime alone (no handler), CPU per 1,000 events",
            f"{floor_cpu / count * 1000:.3f} s",
        )
        for source in sources:
            batches = (await scrape(port, source.stream)).minus(before[source.stream])
            if not batches.count:
                continue
            p50, p99 = batches.quantile(0.50) * 1000, batches.quantile(0.99) * 1000
            r.add(
                f"{label}: {source.what} batches, per batch, p50 / p99",
                f"{batches.count:,.0f}, {count / batches.count:,.1f}, {p50:.1f} / {p99:.1f} ms",
            )

    async def start_floor(self, js: JetStreamContext, sources: list[Source]) -> Child:
        """(5)'s baseline: a process running the consumer runtime alone on durables of its own
        with the recorder's settings, from the next message on."""
        for source in sources:
            config = next(
                c
                for s, c in bus.CONSUMERS
                if s == source.stream and c.durable_name == source.durable
            )
            await js.add_consumer(
                source.stream,
                dataclasses.replace(
                    config, durable_name=FLOOR_DURABLE, deliver_policy=DeliverPolicy.NEW
                ),
            )
        argv = [sys.executable, "-c", FLOOR, self.env["NATS_URL"], FLOOR_DURABLE]
        argv += [s.stream for s in sources]
        child = Child("floor", argv, self.env, self.tmp / "floor.log")
        self.children.append(child.spawn())
        await child.wait_for_log("floor ready")
        self.sampler.watch("floor", child.pid, children=False)
        return child

    async def wait_acked(
        self,
        js: JetStreamContext,
        reader: Child,
        source: Source,
        timeout: float,
        durable: str | None = None,
    ) -> None:
        """Until `durable` (the recorder's by default) acked the source up to its last."""
        deadline = time.monotonic() + timeout
        seen = "no consumer info yet"
        while time.monotonic() < deadline:
            reader.check_alive()
            info = await js.consumer_info(source.stream, durable or source.durable, timeout=2)
            floor = info.ack_floor.stream_seq if info.ack_floor else 0
            seen = f"ack floor {floor}, pending {info.num_pending}, un-acked {info.num_ack_pending}"
            if floor >= source.last_seq and info.num_pending == 0 and info.num_ack_pending == 0:
                return
            await asyncio.sleep(POLL_S)
        raise BenchError(f"{reader.name} did not drain {source.stream} in {timeout:g}s ({seen})")

    async def check_history(self, expected: int) -> None:
        assert self.database is not None
        engine = make_engine(self.database.url)
        try:
            async with make_sessionmaker(engine)() as session:
                found = await session.scalar(
                    select(func.count()).where(HistoryEntry.device_id.in_(self.device_ids))
                )
        finally:
            await engine.dispose()
        if found != expected:
            raise BenchError(f"{found} history rows for {expected} events")
        self.results.notes.append(f"(2) history rows: {found:,}, one per event")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000, help="events (and state facts)")
    parser.add_argument("--devices", type=int, default=1000, help="devices they come from")
    parser.add_argument(
        "--database-url",
        help="a Postgres server: the run creates a database bench_<random> there and drops it",
    )
    parser.add_argument(
        "--nats-sync",
        default=Settings.nats_sync,
        help=f"JetStream sync_interval: the platform's default ({Settings.nats_sync}), "
        "'always' or e.g. '2m'",
    )
    parser.add_argument("--no-facts", action="store_true", help="events only, no state facts")
    parser.add_argument("--profile", help="run the recorder under cProfile, its profile here")
    parser.add_argument("--rate", type=float, default=1000.0, help="(5): events per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="(5): for so long (0: no (5))")
    args = parser.parse_args(argv)
    if args.events < 1 or args.devices < 1:
        parser.error("--events and --devices must be at least 1")
    if args.profile:
        args.profile = str(Path(args.profile).resolve())  # the recorder runs elsewhere
    return args


async def amain(bench: Bench) -> None:
    try:
        await bench.run()
    finally:
        await bench.teardown()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="smarthome-bench-"))
    bench = Bench(args, tmp)
    return run_bench(amain(bench), tmp, bench.results)


if __name__ == "__main__":
    sys.exit(main())
