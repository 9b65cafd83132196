"""Benchmark of the recorder on one machine: prints a table; not a test.

    python ops/bench/recorder.py [--events 20000] [--devices 1000] [--transitions 0.01]
                                 [--database-url URL] [--nats-sync 1s|always|2m] [--no-facts]
                                 [--profile PATH] [--rate 1000] [--seconds 10]

Everything runs against processes of its own: a nats-server from the wheel on a free port
and a fresh database (SQLite in a temporary directory, or a database `bench_<random>`
created on the given Postgres server and dropped at the end). The streams and the
recorder's durable consumers are provisioned as the gateway does, and the recorder's
consumers paused; then the streams are pre-filled as the platform would fill them: N
telemetry events round-robin over D devices on `events.<device>.telemetry` (CloudEvents,
their id as `Nats-Msg-Id`), and, unless `--no-facts`, what the actors publish for them
(`libs.actor_batch`): for each event its state fact on `system.device.<device>.state`
(message id `state:<device>:<version>`), an attribute change alone, but for a
`--transitions` share of the events (0.01), spread evenly: a transition, the device came
back online or was switched on (`changed` holds `connection` or `state`), its fact published
on the state subject and its same bytes on `system.device.<device>.transition`
(`transition:<device>:<version>`). The recorder's consumer of SYSTEM reads the transitions
and the other platform facts, not the state facts (`libs.bus.RECORDER_SYSTEM_FILTERS`): it
audits the transitions (a `state.changed` row each) and is never given the rest. The
figures, in the order they are measured:

(1) raw pull + ack: a scratch durable consumer with the recorder's settings on each stream
    (its filters, AckPolicy.ALL, from the first message), read as the consumer runtime reads
    (`libs.pull.Puller`, the recorder's batch) with one ack per batch, in this process: the
    ceiling for any consumer of those messages on this machine, and the baseline. On SYSTEM
    that is the transitions alone.
(2) the recorder (`python -m services.recorder`, started and ready before its consumer on
    EVENTS is resumed) drains the events: wall time, events/s and (2)/(1), CPU seconds per
    1,000 events (the process's user + system time, from psutil, over the drain), batches
    written and their p50/p99 write time (commit included; from the recorder's histogram
    `smarthome_recorder_batch_seconds`, interpolated within its buckets, as Prometheus'
    histogram_quantile does) and the mean (exact: its sum over its count). Every event must
    be in the history table afterwards, once.
(3) the same for what SYSTEM holds for the recorder, its consumer resumed once the events
    are in: the transitions, audited (the audit chain's rows). Beside it, what the change of
    filters is for: the messages its consumer was delivered (`delivered.consumer_seq`,
    redeliveries counted) against the state facts SYSTEM holds: the transitions, none of
    the attribute-only facts (target: delivered = transitions).
(4) peak RSS of the recorder and of nats-server, sampled every 100 ms.
(5) live traffic: events (each followed by its state fact, and its transition for the
    `--transitions` share, unless `--no-facts`) published at a steady `--rate` (1,000/s) on
    an absolute schedule for `--seconds` (10), as devices and the actors would: the
    recorder's share of a core and its CPU seconds per 1,000 events (their transitions
    included) while it keeps up, and the size of its batches. Batches are small at a steady
    rate, so what a batch costs whatever its size shows here. The baseline: a process
    running the consumer runtime alone (`libs.consumer`, batching as the recorder does, a
    handler that does nothing) on durables of its own with the recorder's filters over the
    same messages at the same time: what receiving and acking them costs any worker.
(6) afterwards, the whole run's delivered count against SYSTEM's state facts again.

A consumer has drained when its ack floor is at or past the last message on its filters
(the sequence its publish was acked with, not the stream's last: SYSTEM's last message is
a state fact the recorder never sees) and nothing is pending or un-acked. The database is
checked at the end: one history row per event, one `state.changed` audit row per transition.

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
import msgspec
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
from nats.js.api import DeliverPolicy, PubAck
from sqlalchemy import func, select

from libs import bus, subjects
from libs import messages as m
from libs.actor_batch import is_transition
from libs.db.engine import make_engine, make_sessionmaker
from libs.db.models import AuditEntry, HistoryEntry
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


def telemetry(device_ids: list[str], count: int, start: int = 0) -> list[Outgoing]:
    """Events `start`.. `start + count` of the run: telemetry round-robin over the devices,
    as a meter sends it."""
    size = len(device_ids)
    out = []
    for n in range(start, start + count):
        data = {"power_w": 20.0 + n % 40, "energy_wh": n // size, "on": True}
        event = m.make_event(device_ids[n % size], "telemetry", data)
        out.append(Outgoing(event.nats_subject, m.encode(event), event.id))
    return out


def is_transition_at(n: int, share: float) -> bool:
    """Whether the run's event `n` changes more than attributes: a `share` of them, evenly
    spread (⌊k·share⌋ of the first k, up to the float's rounding)."""
    return int((n + 1) * share) > int(n * share)


def actors_facts(
    device_ids: list[str], events: list[Outgoing], start: int, share: float
) -> list[list[Outgoing]]:
    """What the actors publish for each of `events` (the run's events `start`..): its state
    fact (version n // D + 1 of its device, message id `state:<device>:<version>`), of an
    attribute change alone; for a `share` of them (`is_transition_at`) a transition instead,
    the device's connection (offline → online) or its state (off → active) changed beside
    its attributes, its fact published on `system.device.<id>.state` and its same bytes on
    `system.device.<id>.transition` (`transition:<device>:<version>`), as
    `libs.actor_batch.transition_fact` does."""
    at = m.now()
    size = len(device_ids)
    out = []
    for n, event in enumerate(events, start=start):
        device = device_ids[n % size]
        version = n // size + 1
        attributes: dict[str, m.AttributeValue] = {
            "power_w": 20.0 + n % 40,
            "energy_wh": n // size,
            "on": True,
        }
        fact = attribute_fact(device, version, attributes, event.msg_id, at)
        transition = is_transition_at(n, share)
        if transition and int((n + 1) * share) % 2:  # the device came back
            fact = msgspec.structs.replace(fact, changed=["connection", "attributes"])
        elif transition:  # it was switched on
            fact = msgspec.structs.replace(
                fact, changed=["state", "attributes"], previous_state="off"
            )
        body = m.encode(fact)
        published = [Outgoing(subjects.device_state(device), body, f"state:{device}:{version}")]
        if transition:
            assert is_transition(fact.changed)  # what the actors would publish as one
            published.append(
                Outgoing(subjects.device_transition(device), body, f"transition:{device}:{version}")
            )
        out.append(published)
    return out


def on_filters(subject: str, filters: tuple[str, ...]) -> bool:
    return any(subjects.matches(f, subject) for f in filters)


def last_on(
    messages: list[Outgoing], acks: list[PubAck], filters: tuple[str, ...]
) -> tuple[int, int]:
    """How many of the published `messages` a consumer of `filters` reads, and the stream
    sequence of the last of them (0: none)."""
    seqs = [
        ack.seq for o, ack in zip(messages, acks, strict=True) if on_filters(o.subject, filters)
    ]
    return len(seqs), max(seqs, default=0)


async def publish_all(js: JetStreamContext, messages: list[Outgoing]) -> tuple[float, list[PubAck]]:
    """Publish with `publish_async`, wait for every ack; messages per second, the acks."""
    started = time.perf_counter()
    futures = [
        await js.publish_async(o.subject, o.body, headers={bus.MSG_ID: o.msg_id}) for o in messages
    ]
    acks = await gather_acks(futures, len(messages), 300)
    return len(messages) / (time.perf_counter() - started), acks


async def gather_acks(
    futures: list[asyncio.Future[PubAck]], count: int, timeout: float
) -> list[PubAck]:
    """The publishes' acks, in their order; none failed, none taken for a duplicate."""
    results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), timeout)
    acks = [a for a in results if not isinstance(a, BaseException)]
    if len(acks) < count:
        first = next(a for a in results if isinstance(a, BaseException))
        raise BenchError(f"{count - len(acks)} of {count} publishes failed: {first!r}")
    if any(a.duplicate for a in acks):
        raise BenchError("a publish was taken for a duplicate: the message ids collide")
    return acks


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
    """One stream the recorder reads, as this run fills it: `count` messages on its
    consumer's filters (`bus.RECORDER_SOURCES`), the last of them at `last_seq`."""

    stream: str
    what: str  # what its messages are, in the table
    count: int
    last_seq: int

    @property
    def durable(self) -> str:
        return bus.recorder_durable(self.stream)

    @property
    def filters(self) -> tuple[str, ...]:
        return bus.RECORDER_SOURCES[self.stream]


class Bench(Stage):
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        super().__init__(tmp, stop_grace=60.0)  # a profile takes a while to write
        self.args = args
        self.run_id = secrets.token_hex(3)
        self.device_ids = [f"rec-{self.run_id}-{i:05d}" for i in range(args.devices)]
        self.results = Results()
        self.transitions = 0  # published, pre-filled and live: the audit rows expected

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
        events = telemetry(self.device_ids, a.events)
        facts = [] if a.no_facts else actors_facts(self.device_ids, events, 0, a.transitions)
        sources = [await self.fill(js, subjects.EVENTS_STREAM, "events", events)]
        if facts:
            flat = [o for published in facts for o in published]
            sources.append(await self.fill(js, subjects.SYSTEM_STREAM, "transitions", flat))
        r.header.append(
            f"{a.events:,} events over {a.devices:,} devices"
            + (
                ""
                if a.no_facts
                else f", their {a.events:,} state facts, {sources[1].count:,} of them "
                f"transitions too ({a.transitions:.1%})"
            )
            + f"; database {db.kind}; batch {bus.RECORDER_BATCH}; {os.cpu_count()} CPUs; "
            f"nats-server with JetStream file storage, sync_interval {a.nats_sync}"
        )
        load_before = os.getloadavg()[0]

        raw = {s.stream: await self.raw_pull(js, s) for s in sources if s.count}
        recorder, port = await self.start_recorder()
        for number, source in enumerate(sources, start=2):
            await self.drain(js, recorder, port, source, raw.get(source.stream), f"({number})")
        live = int(a.rate * a.seconds)
        if a.seconds > 0:
            await self.live(js, recorder, port, sources)
        await self.check_rows(js, a.events + live, self.transitions)
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

    async def fill(
        self, js: JetStreamContext, stream: str, what: str, messages: list[Outgoing]
    ) -> Source:
        rate, acks = await publish_all(js, messages)
        count, last_seq = last_on(messages, acks, bus.RECORDER_SOURCES[stream])
        if stream == subjects.SYSTEM_STREAM:
            self.transitions += count
        self.results.notes.append(
            f"(1) {len(messages):,} messages published to {stream} with publish_async at "
            f"{rate:,.0f} msgs/s: {count:,} {what} on the recorder's filters"
        )
        return Source(stream, what, count, last_seq)

    async def raw_pull(self, js: JetStreamContext, source: Source) -> float:
        """(1): pull + ack every message of the source's filters from a scratch durable with
        the recorder's settings, in this process."""
        config = bus.recorder_consumer(source.stream)
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
                    last, _ = msgs[-1]  # (the message, its reply parsed)
                    await last.ack()  # AckPolicy.ALL: the batch
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
        raw_rate: float | None,
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
        if source.stream == subjects.SYSTEM_STREAM:
            await self.report_delivered(js, figure, source.count)
        if not source.count or raw_rate is None:
            r.add(f"{figure} recorder drain of 0 {what}", f"{elapsed:.2f} s")
            return
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

    async def report_delivered(
        self, js: JetStreamContext, figure: str, expected: int, note: bool = True
    ) -> None:
        """What SYSTEM holds against what the recorder's consumer of it was given: the
        transitions, none of the attribute-only state facts (their consumer's filters)."""
        stored = await js.stream_info(
            subjects.SYSTEM_STREAM, subjects_filter=subjects.DEVICE_STATES_ALL
        )
        facts = sum((stored.state.subjects or {}).values())
        durable = bus.recorder_durable(subjects.SYSTEM_STREAM)
        info = await js.consumer_info(subjects.SYSTEM_STREAM, durable)
        delivered = info.delivered.consumer_seq
        self.results.add(
            f"{figure} delivered to {durable} / state facts on SYSTEM",
            f"{delivered:,} / {facts:,}",
            f"= transitions ({expected:,})",
            delivered == expected,
        )
        if note:
            self.results.notes.append(
                f"{figure} SYSTEM holds {facts:,} state facts (their changes of attributes alone "
                f"among them: {facts - expected:,}); the recorder's consumer was delivered "
                f"{delivered:,} messages (redeliveries counted), the {expected:,} transitions: "
                "the attribute-only facts never reach it"
            )

    async def live(
        self, js: JetStreamContext, recorder: Child, port: int, sources: list[Source]
    ) -> None:
        """(5): publish at a steady rate, then wait until the recorder acked it all."""
        a = self.args
        count = int(a.rate * a.seconds)
        events = telemetry(self.device_ids, count, start=a.events)
        facts = (
            actors_facts(self.device_ids, events, a.events, a.transitions) if sources[1:] else []
        )
        floor = await self.start_floor(js, sources)
        before = {s.stream: await scrape(port, s.stream) for s in sources}
        cpu_before = self.sampler.cpu_seconds()
        sent: list[Outgoing] = []
        futures = []
        begin = time.perf_counter() + 0.05
        for i, event in enumerate(events):
            # An absolute schedule: a late tick is followed by a burst, not by drift.
            await asyncio.sleep(max(begin + i / a.rate - time.perf_counter(), 0))
            for o in (event, *facts[i]) if facts else (event,):
                sent.append(o)
                futures.append(
                    await js.publish_async(o.subject, o.body, headers={bus.MSG_ID: o.msg_id})
                )
        acks = await gather_acks(futures, len(futures), 60)
        grown = []
        for source in sources:
            on = [
                (o, ack) for o, ack in zip(sent, acks, strict=True) if ack.stream == source.stream
            ]
            n, last_seq = last_on([o for o, _ in on], [ack for _, ack in on], source.filters)
            grown.append(Source(source.stream, source.what, n, last_seq))
            await self.wait_acked(js, recorder, grown[-1], timeout=60)
            await self.wait_acked(js, floor, grown[-1], timeout=60, durable=FLOOR_DURABLE)
        wall = time.perf_counter() - begin
        after = self.sampler.cpu_seconds()
        cpu = after["recorder"] - cpu_before["recorder"]
        floor_cpu = after["floor"] - cpu_before["floor"]
        live_transitions = sum(s.count for s in grown if s.stream == subjects.SYSTEM_STREAM)
        self.transitions += live_transitions
        r = self.results
        label = f"(5) live {a.rate:,.0f} events/s{' + facts' if facts else ''}, {a.seconds:g} s"
        if facts:
            r.notes.append(
                f"(5) live: {count:,} events, their {count:,} state facts and "
                f"{live_transitions:,} transitions ({a.transitions:.1%}) on SYSTEM"
            )
        r.add(f"{label}: recorder CPU", f"{cpu / wall:.0%} of one core")
        r.add(f"{label}: CPU per 1,000 events", f"{cpu / count * 1000:.3f} s")
        r.add(
            f"{label}: the runtime alone (no handler), CPU per 1,000 events",
            f"{floor_cpu / count * 1000:.3f} s",
        )
        for source in grown:
            batches = (await scrape(port, source.stream)).minus(before[source.stream])
            if not batches.count:
                continue
            p50, p99 = batches.quantile(0.50) * 1000, batches.quantile(0.99) * 1000
            r.add(
                f"{label}: {source.what} batches, per batch, p50 / p99",
                f"{batches.count:,.0f}, {source.count / batches.count:,.1f}, "
                f"{p50:.1f} / {p99:.1f} ms",
            )

    async def start_floor(self, js: JetStreamContext, sources: list[Source]) -> Child:
        """(5)'s baseline: a process running the consumer runtime alone on durables of its own
        with the recorder's settings (its filters too), from the next message on."""
        for source in sources:
            await js.add_consumer(
                source.stream,
                dataclasses.replace(
                    bus.recorder_consumer(source.stream),
                    durable_name=FLOOR_DURABLE,
                    deliver_policy=DeliverPolicy.NEW,
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
        """Until `durable` (the recorder's by default) acked every message of the source on
        its filters: its ack floor at or past the last of them (`source.last_seq`, from the
        publishes' acks: never the stream's last, which its filters may not cover), nothing
        left pending on its filters nor delivered and not acked. The ack floor of AckPolicy.ALL
        only moves past a message once it and all before it were acked, so this cannot hold
        before the last message was handled."""
        deadline = time.monotonic() + timeout
        seen = "no consumer info yet"
        while time.monotonic() < deadline:
            reader.check_alive()
            info = await js.consumer_info(source.stream, durable or source.durable, timeout=2)
            floor = info.ack_floor.stream_seq if info.ack_floor else 0
            seen = (
                f"ack floor {floor} of {source.last_seq}, pending {info.num_pending}, "
                f"un-acked {info.num_ack_pending}"
            )
            if floor >= source.last_seq and info.num_pending == 0 and info.num_ack_pending == 0:
                return
            await asyncio.sleep(POLL_S)
        raise BenchError(f"{reader.name} did not drain {source.stream} in {timeout:g}s ({seen})")

    async def check_rows(self, js: JetStreamContext, events: int, transitions: int) -> None:
        """History rows: one per event; audit rows of state changes: one per transition."""
        assert self.database is not None
        engine = make_engine(self.database.url)
        try:
            async with make_sessionmaker(engine)() as session:
                history = await session.scalar(
                    select(func.count()).where(HistoryEntry.device_id.in_(self.device_ids))
                )
                audited = await session.scalar(
                    select(func.count()).where(
                        AuditEntry.action == "state.changed",
                        AuditEntry.device_id.in_(self.device_ids),
                    )
                )
        finally:
            await engine.dispose()
        if history != events:
            raise BenchError(f"{history} history rows for {events} events")
        if audited != transitions:
            raise BenchError(f"{audited} state.changed audit rows for {transitions} transitions")
        self.results.notes.append(f"(2) history rows: {history:,}, one per event")
        self.results.notes.append(f"(3) audit rows state.changed: {audited:,}, one per transition")
        if not self.args.no_facts:
            await self.report_delivered(js, "(6) whole run,", transitions, note=False)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000, help="events (and state facts)")
    parser.add_argument(
        "--transitions",
        type=float,
        default=0.01,
        help="the share of events whose state fact is a transition too (0-1; default 0.01)",
    )
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
    parser.add_argument(
        "--no-facts", action="store_true", help="events only, no state facts nor transitions"
    )
    parser.add_argument("--profile", help="run the recorder under cProfile, its profile here")
    parser.add_argument("--rate", type=float, default=1000.0, help="(5): events per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="(5): for so long (0: no (5))")
    args = parser.parse_args(argv)
    if args.events < 1 or args.devices < 1:
        parser.error("--events and --devices must be at least 1")
    if not 0 <= args.transitions <= 1:
        parser.error("--transitions is a share: between 0 and 1")
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
