"""Benchmark of the rules engine on one machine: prints a table; not a test.

    python ops/bench/rules.py [--rules 1000] [--facts 20000] [--rate 1000] [--seconds 10]
                              [--cross-every 50] [--database-url URL] [--redis-url URL]
                              [--nats-sync 1s|always|2m]
    python ops/bench/rules.py --fleet 10000 [--rules 100] [--facts 10000] [--partitions 1]

With `--fleet D`, a different run (`rules_fleet.py`): what registering D devices, and state
facts no rule reads, cost the rules process; R may be 0 there.

Everything runs against processes of its own: a nats-server from the wheel on a free
port, a fresh database (SQLite in a temporary directory, or a database `bench_<random>`
created on the given Postgres server and dropped at the end), R energy meters and R lights
registered as devices, and R threshold rules "meter i: power_w above 50 W → turn_off
light i". The real services are started as `python -m services.rules` and
`python -m services.actors`. The figures:

(1) raw pull + ack: N state facts (all below the threshold) are published to
    `system.device.<meter>.state` after the streams and consumers exist, then a scratch
    durable consumer on SYSTEM (AckPolicy.ALL, like the rules') is read the way the rules
    service reads (`libs.pull.Puller`, 256 at a time) with one ack per batch, in this
    process: the ceiling for any consumer of those facts on this machine.
(2) facts evaluated per second by one rules process draining the same N facts from its
    durable `rules`: from its first delivery until nothing is pending or un-acked. The
    service's counter `smarthome_rule_evaluations_total` (its /metrics) gives the rule
    evaluations per second over the same window (one rule watches each meter, so one
    evaluation per fact); and (2)/(1). Draining a backlog keeps the publisher off the CPUs
    while the rules process works.
(3) latency from publishing a device event (`events.<meter>.telemetry`) to receiving the
    command on `commands.<light>`, through the actors and the rules, while telemetry is
    published at a steady rate (1,000/s) on an absolute schedule, round-robin over the
    meters. Every event changes the meter's power (so each produces a state fact and an
    evaluation); a meter's first event is a warm-up below the line, then it crosses the
    line upward on one event in `--cross-every` (50: about 18 commands/s) and back down on
    its next event, so each crossing starts a new episode. The command is matched to its
    event exactly, through the rule's trace (`system.rule.<id>.fired`: trigger event id
    and command id). The latency is also split at the state fact: the actors' part and
    the rules' part.
(4) peak RSS of the rules process (and of the others), sampled every 100 ms.

Targets (the issue): (2) ≥ 5,000 evaluations/s per process; (3) p99 ≤ 25 ms at 1,000
events/s. A miss is reported in the table; the exit status is 0 whenever the run
completed, and not 0 when it could not (a service failed, a deadline passed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shutil
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
    CpuShare,
    Results,
    Stage,
    attribute_fact,
    cause_decoder,
    percentile,
    print_table,
    service_env,
    wait_actors_settled,
)
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from sqlalchemy import func, select

from libs import bus, subjects
from libs import messages as m
from libs.db.engine import make_engine, make_sessionmaker
from libs.db.models import CommandRecord, Device, RuleRecord
from libs.pull import Puller
from libs.settings import Settings

FETCH_BATCH = 256  # what the rules service asks for (services/rules/engine.py)
RAW_DURABLE = "bench-raw"
# What the rules service exposes (services/rules/engine.py) and logs when it starts working.
EVALUATIONS_METRIC = "smarthome_rule_evaluations_total"
THRESHOLD_W = 50.0
EVALUATIONS_TARGET = 5000.0
P99_TARGET_MS = 25.0
POLL_S = 0.02


async def scrape_evaluations(port: int) -> float | None:
    """The sum of `smarthome_rule_evaluations_total` over its outcomes; None if unanswered."""
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            exposition = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    except httpx.HTTPError:
        return None
    total = 0.0
    for line in exposition.splitlines():
        name, _, value = line.rpartition(" ")
        if name == EVALUATIONS_METRIC or name.startswith(EVALUATIONS_METRIC + "{"):
            total += float(value)
    return total


# --- the database ----------------------------------------------------------------------


@dataclass(frozen=True)
class Home:
    """R meters, R lights and the R rules that join them, pairwise."""

    meters: list[str]
    lights: list[str]
    rule_ids: list[str]

    @classmethod
    def make(cls, run_id: str, size: int) -> Home:
        return cls(
            [f"meter-{run_id}-{i:04d}" for i in range(size)],
            [f"light-{run_id}-{i:04d}" for i in range(size)],
            [f"bench-{run_id}-{i:04d}" for i in range(size)],
        )

    def specs(self) -> list[m.RuleSpec]:
        return [
            m.RuleSpec(
                name=f"bench: {meter} above {THRESHOLD_W:g} W turns {light} off",
                trigger=m.ThresholdTrigger(
                    attribute="power_w", device_id=meter, above=THRESHOLD_W, for_=0.0
                ),
                actions=[m.CommandAction(device_id=light, action="turn_off")],
                id=rule_id,
            )
            for meter, light, rule_id in zip(self.meters, self.lights, self.rule_ids, strict=True)
        ]

    async def store(self, database_url: str) -> None:
        engine = make_engine(database_url)
        try:
            async with make_sessionmaker(engine).begin() as session:
                session.add_all(
                    Device(id=d, name=d, kind="energy_meter", location="bench/floor/room")
                    for d in self.meters
                )
                session.add_all(
                    Device(id=d, name=d, kind="light", location="bench/floor/room")
                    for d in self.lights
                )
            async with make_sessionmaker(engine).begin() as session:
                session.add_all(
                    RuleRecord(
                        id=spec.id, name=spec.name, spec=msgspec.to_builtins(spec), enabled=True
                    )
                    for spec in self.specs()
                )
        finally:
            await engine.dispose()

    async def commands_recorded(self, database_url: str) -> int:
        engine = make_engine(database_url)
        try:
            async with make_sessionmaker(engine)() as session:
                query = select(func.count()).where(CommandRecord.device_id.in_(self.lights))
                return int((await session.scalar(query)) or 0)
        finally:
            await engine.dispose()


# --- messages --------------------------------------------------------------------------


def below_line(step: int) -> float:
    """A power under the threshold that differs from one step to the next."""
    return 20.0 + (step % 40) * 0.25


def above_line(step: int) -> float:
    return THRESHOLD_W + 10.0 + (step % 40) * 0.25


def state_facts(home: Home, run_id: str, count: int) -> list[tuple[str, bytes, str]]:
    """`count` facts round-robin over the meters, all below the line: pure evaluation.

    Their message ids are this run's own: the actors' ids (`state:<id>:<version>`) must not
    be taken by them, or the stream's de-duplication would drop real facts later.
    """
    out = []
    at = m.now()
    size = len(home.meters)
    for n in range(count):
        meter = home.meters[n % size]
        attributes: dict[str, m.AttributeValue] = {"power_w": below_line(n // size)}
        fact = attribute_fact(meter, n // size + 1, attributes, f"bench-{run_id}-{n}", at)
        out.append((subjects.device_state(meter), m.encode(fact), f"bench:{run_id}:{n}"))
    return out


@dataclass(frozen=True)
class Telemetry:
    subject: str
    body: bytes
    event_id: str
    crossing: bool  # upward across the line: a command is due


def telemetry_plan(home: Home, count: int, cross_every: int) -> list[Telemetry]:
    """Round-robin over the meters; a meter's round `j` crosses upward when
    `(i + j) % cross_every == 0` (never in round 0, the warm-up), and comes back down on
    its next event, which ends the episode."""
    size = len(home.meters)
    above = [False] * size
    plan = []
    for n in range(count):
        i, j = n % size, n // size
        crossing = False
        if above[i]:
            power, above[i] = below_line(j), False
        elif j >= 1 and (i + j) % cross_every == 0:
            power, above[i], crossing = above_line(j), True, True
        else:
            power = below_line(j)
        event = m.make_event(home.meters[i], "telemetry", {"power_w": power})
        plan.append(Telemetry(event.nats_subject, m.encode(event), event.id, crossing))
    return plan


async def publish_all(js: JetStreamContext, messages: list[tuple[str, bytes, str]]) -> int:
    """Publish with `publish_async` and wait for every ack; the number that failed."""
    futures = [
        await js.publish_async(subject, body, headers={bus.MSG_ID: msg_id})
        for subject, body, msg_id in messages
    ]
    acks = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 120)
    return sum(1 for a in acks if isinstance(a, BaseException))


# --- the run ---------------------------------------------------------------------------


class Bench(Stage):
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        super().__init__(tmp)
        self.args = args
        self.run_id = secrets.token_hex(3)
        self.home = Home.make(self.run_id, args.rules)
        self.results = Results()

    # -- set-up -------------------------------------------------------------------------

    async def setup(self) -> JetStreamContext:
        nats_url = await self.start_nats_server(self.args.nats_sync)
        self.sampler.watch("bench", os.getpid(), children=False)
        self.sampler.start()
        database = await self.open_database(self.args.database_url)
        await self.home.store(database.url)
        self.env = service_env(nats_url, database.url, self.tmp / "data", self.args.redis_url)
        js = await self.connect(nats_url)
        # The rules' durable (one partition, deliver NEW) exists before any fact is
        # published; the rules service would create it only when it starts.
        await js.add_consumer(subjects.SYSTEM_STREAM, bus.rules_facts_consumer(0))
        return js

    async def start_service(self, name: str, module: str) -> tuple[Child, int]:
        """`python -m module` with a probe port; returns at once (the caller waits)."""
        child = self.spawn_child(name, [sys.executable, "-m", module])
        return child, child.port

    # -- the figures ------------------------------------------------------------------------

    async def run(self) -> Results:
        js = await self.setup()
        db = self.database
        assert db is not None and self.nc is not None
        r = self.results
        a = self.args
        r.header.append(
            f"{a.rules:,} threshold rules over {a.rules:,} meters (+{a.rules:,} lights); "
            f"{a.facts:,} facts for (1)/(2); database {db.kind}; "
            f"cache {'Redis' if a.redis_url else 'in-process'}; {os.cpu_count()} CPUs; "
            f"nats-server with JetStream file storage, sync_interval {self.args.nats_sync}"
        )
        load_before = os.getloadavg()[0]

        raw_rate = await self.raw_pull(js)
        rules, rules_port = await self.start_service("rules", "services.rules")
        await self.rules_drain(js, rules, rules_port, raw_rate)
        actors, actors_port = await self.start_service("actors", "services.actors")
        await self.wait_ready(actors, actors_port)
        await wait_actors_settled(js, 1)  # every partition held
        await self.latency(js, self.nc, rules, actors)

        for name, peak in self.sampler.peaks.items():
            if name != "bench":
                r.add(f"(4) peak RSS {name}", f"{peak / MB:,.0f} MB")
        r.header.append(
            f"load average (1 min) {load_before:.2f} before the run, "
            f"{os.getloadavg()[0]:.2f} after: above ~0.5 before, other work shared the CPUs"
        )
        return r

    async def raw_pull(self, js: JetStreamContext) -> float:
        """(1): pre-fill SYSTEM with the facts, then pull + ack them all, in-process."""
        facts = state_facts(self.home, self.run_id, self.args.facts)
        started = time.perf_counter()
        failed = await publish_all(js, facts)
        published = time.perf_counter() - started
        if failed:
            raise BenchError(f"(1): {failed} of {len(facts)} publishes failed")
        self.results.notes.append(
            f"(1) {len(facts):,} facts published with publish_async at "
            f"{len(facts) / published:,.0f} msgs/s before the pull"
        )
        # The same settings as the durable `rules`, but from the first fact on.
        await js.add_consumer(
            subjects.SYSTEM_STREAM,
            ConsumerConfig(
                durable_name=RAW_DURABLE,
                filter_subject=subjects.DEVICE_STATES_ALL,
                ack_policy=AckPolicy.ALL,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=30.0,
                max_ack_pending=1000,
            ),
        )
        assert self.nc is not None
        puller = Puller(self.nc, subjects.SYSTEM_STREAM, RAW_DURABLE)
        await puller.start()
        cpu = CpuShare(self.sampler)
        got = 0
        deadline = time.monotonic() + 60
        try:
            started = time.perf_counter()
            while got < len(facts) and time.monotonic() < deadline:
                msgs = await puller.fetch(FETCH_BATCH, timeout=1.0)
                if msgs:
                    await msgs[-1][0].ack()  # AckPolicy.ALL: the batch
                got += len(msgs)
            await self.nc.flush()  # every ack has reached the server
            elapsed = time.perf_counter() - started
        finally:
            await puller.stop()
            await js.delete_consumer(subjects.SYSTEM_STREAM, RAW_DURABLE)
        if got < len(facts):
            raise BenchError(f"(1): pulled {got} of {len(facts)} facts within 60 s")
        self.results.notes.append(f"(1) {cpu.summary()}")
        rate = got / elapsed
        self.results.add("(1) raw durable pull + ack per batch", f"{rate:,.0f} msgs/s")
        return rate

    async def rules_drain(
        self, js: JetStreamContext, rules: Child, port: int, raw_rate: float
    ) -> None:
        """(2): the rules process drains the facts from `rules`; timed from its first
        delivery (start-up and loading are not evaluation) until nothing is left."""
        total = self.args.facts
        deadline = time.monotonic() + max(30.0, total / 250)
        # When the first delivery was seen, what was left then, the counter and when read.
        first: tuple[float, int, float | None, float] | None = None
        seen = "no delivery yet"
        cpu: CpuShare | None = None
        while True:
            if time.monotonic() > deadline:
                raise BenchError(f"(2): the rules did not drain SYSTEM in time ({seen})")
            rules.check_alive()
            info = await js.consumer_info(
                subjects.SYSTEM_STREAM, bus.rules_facts_durable(0), timeout=2
            )
            at = time.perf_counter()
            left = info.num_pending + info.num_ack_pending
            delivered = info.delivered.consumer_seq if info.delivered else 0
            seen = f"{left:,} pending or un-acked, {delivered:,} delivered"
            if first is None and delivered > 0:
                cpu = CpuShare(self.sampler)
                # The counter is read when the service answers, between two of its batches.
                evaluations_then = await scrape_evaluations(port)
                first = (at, left, evaluations_then, time.perf_counter())
            elif first is not None and left == 0:
                break
            await asyncio.sleep(POLL_S)
        assert cpu is not None
        self.results.notes.append(f"(2) {cpu.summary()}")
        # Its consumers start after the rules are loaded: this only checks that all were.
        await rules.wait_for_log(f"loaded {self.args.rules} rules", timeout=5)
        started, left_then, evaluations_then, scraped_at = first
        elapsed = at - started
        rate = left_then / elapsed
        evaluations = await scrape_evaluations(port)
        r = self.results
        r.add("(2) facts evaluated by one rules process", f"{rate:,.0f} facts/s")
        if evaluations is not None and evaluations_then is not None:
            eval_rate = (evaluations - evaluations_then) / (at - scraped_at)
            ok = eval_rate >= EVALUATIONS_TARGET
            r.add(
                f"(2) rule evaluations ({EVALUATIONS_METRIC})",
                f"{eval_rate:,.0f} evals/s",
                f"≥ {EVALUATIONS_TARGET:,.0f}/s",
                ok,
            )
            if evaluations != total:
                r.notes.append(
                    f"(2): {evaluations:,.0f} evaluations for {total:,} facts (expected one each)"
                )
        else:
            r.add(f"(2) {EVALUATIONS_METRIC}", "not scraped", f"≥ {EVALUATIONS_TARGET:,.0f}/s")
        r.add("(2)/(1) rules drain vs raw pull + ack", f"{rate / raw_rate:.0%}")
        r.notes.append(
            f"(2) timed from the first delivery: {left_then:,} facts in {elapsed:.2f} s "
            "(the rest had been delivered before the first poll saw it)"
        )

    async def latency(self, js: JetStreamContext, nc: NATS, rules: Child, actors: Child) -> None:
        """(3): event → command at a steady rate, matched through the rule's trace."""
        a = self.args
        plan = telemetry_plan(self.home, int(a.rate * a.seconds), a.cross_every)
        crossings = {t.event_id for t in plan if t.crossing}
        sent: dict[str, float] = {}
        fact_at: dict[str, float] = {}  # crossing event id -> its state fact arrived
        command_at: dict[str, float] = {}  # command id -> it arrived
        trigger_of: dict[str, str] = {}  # command id -> the event that caused it
        all_fired = asyncio.Event()

        async def on_fact(msg: Msg) -> None:
            at = time.perf_counter()
            cause = cause_decoder.decode(msg.data).cause_event_id
            if cause in crossings:
                fact_at.setdefault(cause, at)

        async def on_command(msg: Msg) -> None:
            at = time.perf_counter()
            command_id = (msg.headers or {}).get(bus.MSG_ID) or m.command_decoder.decode(
                msg.data
            ).id
            command_at.setdefault(command_id, at)

        async def on_fired(msg: Msg) -> None:
            fired = m.rule_fired_decoder.decode(msg.data)
            if fired.kind != "fired" or fired.trigger_event_id not in crossings:
                return
            for outcome in fired.outcomes:
                if outcome.command_id:
                    trigger_of[outcome.command_id] = fired.trigger_event_id
            if len(trigger_of) >= len(crossings):
                all_fired.set()

        subs = [
            await nc.subscribe(subjects.DEVICE_STATES_ALL, cb=on_fact),
            await nc.subscribe(subjects.COMMANDS_ALL, cb=on_command),
            await nc.subscribe(subjects.RULES_FIRED_ALL, cb=on_fired),
        ]
        await nc.flush()
        futures = []
        cpu = CpuShare(self.sampler)
        try:
            begin = time.perf_counter() + 0.05
            for i, t in enumerate(plan):
                # An absolute schedule: a late tick is followed by a burst, not by drift.
                delay = begin + i / a.rate - time.perf_counter()
                await asyncio.sleep(max(delay, 0))
                sent[t.event_id] = time.perf_counter()
                futures.append(
                    await js.publish_async(t.subject, t.body, headers={bus.MSG_ID: t.event_id})
                )
            span = time.perf_counter() - begin
            acks = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 30)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_fired.wait(), 15)
            await asyncio.sleep(0.1)  # a command published just before its trace
        finally:
            for sub in subs:
                await sub.unsubscribe()
        self.results.notes.append(f"(3) {cpu.summary()}")
        rules.check_alive()
        actors.check_alive()

        total, split_actors, split_rules = [], [], []
        for command_id, event_id in trigger_of.items():
            if command_id not in command_at:
                continue
            total.append((command_at[command_id] - sent[event_id]) * 1000)
            if event_id in fact_at:
                split_actors.append((fact_at[event_id] - sent[event_id]) * 1000)
                split_rules.append((command_at[command_id] - fact_at[event_id]) * 1000)
        if not total:
            raise BenchError(f"(3): no command arrived for {len(crossings)} crossings")
        total.sort()
        split_actors.sort()
        split_rules.sort()
        rate = f"{len(sent) / span:,.0f} events/s"
        r = self.results
        p99 = percentile(total, 99)
        r.add(f"(3) event → command p50 at {rate}", f"{percentile(total, 50):.1f} ms")
        r.add(
            f"(3) event → command p99 at {rate}",
            f"{p99:.1f} ms",
            f"≤ {P99_TARGET_MS:g} ms",
            p99 <= P99_TARGET_MS,
        )
        r.add(f"(3) event → command max at {rate}", f"{total[-1]:.1f} ms")
        if split_actors:
            r.add("(3)   of which event → state fact p99", f"{percentile(split_actors, 99):.1f} ms")
            r.add(
                "(3)   of which state fact → command p99", f"{percentile(split_rules, 99):.1f} ms"
            )
        r.add("(3) commands matched / upward crossings", f"{len(total):,} / {len(crossings):,}")
        failed = sum(1 for ack in acks if isinstance(ack, BaseException))
        assert self.database is not None
        recorded = await self.home.commands_recorded(self.database.url)
        r.notes.append(
            f"(3) {len(plan):,} events in {span:.2f} s, {len(crossings):,} crossing upward "
            f"(1 in {a.cross_every} events after each meter's warm-up event), each back down "
            "on the meter's next event; "
            f"{len(command_at):,} commands received, {recorded:,} command rows recorded; "
            f"{failed} publishes failed"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rules", type=int, default=1000, help="rules, meters and lights")
    parser.add_argument("--facts", type=int, default=20_000, help="state facts for (1) and (2)")
    parser.add_argument("--rate", type=float, default=1000.0, help="events/s for (3)")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of (3)")
    parser.add_argument(
        "--cross-every",
        type=int,
        default=50,
        help="in (3), a meter crosses the threshold upward on 1 event in this many",
    )
    parser.add_argument(
        "--database-url",
        help="a Postgres server: the run creates a database bench_<random> there and drops it",
    )
    parser.add_argument("--redis-url", help="Redis for the actors' hot state (default in-process)")
    parser.add_argument(
        "--nats-sync",
        default=Settings.nats_sync,
        help=f"JetStream sync_interval: the platform's default ({Settings.nats_sync}), "
        "'always' (fsync each message) or an interval like '2m'",
    )
    parser.add_argument(
        "--fleet",
        type=int,
        default=0,
        help="register this many devices no rule reads and measure the rules' CPU (rules_fleet.py)",
    )
    parser.add_argument(
        "--partitions", type=int, default=1, help="with --fleet: SMARTHOME_RULES_PARTITIONS"
    )
    args = parser.parse_args(argv)
    if args.fleet > 0:
        if args.rules < 0 or args.facts < 1:
            parser.error("--rules must be at least 0 and --facts at least 1")
        return args
    if args.rules < 1 or args.facts < 1 or args.cross_every < 1:
        parser.error("--rules, --facts and --cross-every must be at least 1")
    if not 0 < args.rate <= 10_000 or not 0 < args.seconds <= 60:
        parser.error("--rate must be in (0, 10000] and --seconds in (0, 60]")
    if args.rate * args.seconds < 2 * args.rules:
        parser.error("(3) needs at least two events per meter: raise --rate or --seconds")
    return args


async def amain(args: argparse.Namespace, tmp: Path) -> Results:
    if args.fleet > 0:
        from rules_fleet import FleetBench  # it builds on this module

        bench: Bench = FleetBench(args, tmp)
    else:
        bench = Bench(args, tmp)
    try:
        return await bench.run()
    finally:
        await bench.teardown()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="smarthome-bench-rules-"))
    try:
        results = asyncio.run(amain(args, tmp))
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
