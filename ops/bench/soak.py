"""Sustained load on the whole platform: N simulated devices on `smarthome up --no-demo` for
M minutes, sampled every few seconds; prints a table and PASS/FAIL per criterion. Not a test.

    python ops/bench/soak.py [--devices 10000] [--interval 10] [--minutes 10]
                             [--actor-processes 1] [--database-url URL] [--redis-url URL]
                             [--nats-max-store 1GB] [--latency-csv FILE]
    python ops/bench/soak.py --step [--devices 2000] [--step-seconds 120]
                             [--step-start 500] [--step-factor 1.5] [--step-processes 1,2]

The platform is the real one: `python -m services.cli up --no-demo` (the launcher: its own
nats-server with the platform's authorization, every service as a child process), on free
ports, with a data directory in a temporary one, a fresh database (SQLite there, or
`bench_<random>` on the Postgres server of `--database-url`/`DATABASE_URL`, dropped at the
end) and Redis when `--redis-url`/`REDIS_URL` is given (its keys of this run's devices are
deleted at the end). `SMARTHOME_ACTOR_PROCESSES` is set for the launcher; if it runs fewer
actors processes than asked, the bench starts the others itself (same settings, own health
port) and says so.

The load is the existing simulator (`python -m devices.simulator`): a bridge that registers
its devices over HTTP with an administrator's API key and publishes as that bridge, one
reading per device every `--interval` seconds, each at its own phase. Every `--sample-every`
seconds the bench reads: the lag (pending + un-acked) of every durable consumer, the RSS and
CPU of every process of the platform (psutil) and the time its threads were ready to run and
got no CPU (Linux's schedstat: on a busy machine, what a process's latency waits on), the
events the EVENTS stream holds (each one acknowledged to the simulator) and the dead letters.
Event → state fact latency: the bench subscribes (core NATS) to the telemetry and the state
facts of `--sample` sensors and matches each fact to its event by `cause_event_id`; both
times are taken by the bench on arrival. A reading that leaves both of a sensor's values as
they were (random walks rounded to 0.01: about 1 in 4,000) makes no fact: the few events
printed as "without a fact" are expected.

The load window (where latency is counted and the criteria are read) begins once the burst
after the registrations is over: every device says hello first and the gateway looks each one
up (tens of seconds at 10,000 devices on 2 cores, its CPU at 70-90 %); the window opens when
the gateway is back under 20 % of a core (`soak_platform.hellos_answered`), or 2 minutes
after the registrations at most. The table's `hello` rows are that burst.

Criteria (issue 17), each PASS or FAIL: the lag is flat (its least-squares growth over the
load window is under one second of input); p99 event → state fact ≤ 20 ms; every process's
RSS at the end of the load within 10 % of its RSS at a fifth of it (minute 2 of 10); nothing
dead-lettered; history rows of EVENTS = events acknowledged, once everything has drained.

`--step`: the highest rate the platform sustains with the lag flat: for each count of actors
processes, a fresh platform, then steps of `--step-seconds` at a rising rate (the simulator's
interval = devices / rate), until a step's lag grows or the simulator cannot reach its rate.
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
from pathlib import Path

import redis.asyncio as redis
from harness import MB, BenchError, Child, Database, actors_lag, cancel_on_sigterm, percentile
from nats.js import JetStreamContext
from soak_platform import (
    LatencyProbe,
    LoadRun,
    Platform,
    Sample,
    drain,
    load_run,
    print_samples,
    sample_devices,
    simulator,
    simulator_acked,
    stream_count,
    take_sample,
)
from sqlalchemy import text

from libs import subjects
from libs.cache import KEY_PREFIX
from libs.db.engine import make_engine

P99_TARGET_MS = 20.0
# The simulator stands in for devices that are elsewhere (each its own small computer): it
# yields this machine's CPU to the platform, as the launcher's background work does.
SIMULATOR_NICE = 19
LATENCY_WINDOW_S = 5.0  # the p99 of each: a periodic cause shows as a pattern
RSS_GROWTH_TARGET = 0.10
RSS_BASELINE_AT = 0.2  # minute 2 of 10
DRAIN_TIMEOUT_S = 300.0


def verdict(name: str, ok: bool, detail: str) -> tuple[str, bool]:
    line = f"{'PASS' if ok else 'FAIL'}  {name}: {detail}"
    print(line)
    return line, ok


def rss_growth(run: LoadRun, minutes: float) -> dict[str, tuple[float, float]]:
    """Each platform process's RSS (MB) at a fifth of the load and at its end."""
    window = run.window()
    if not window:
        return {}
    at = window[0].t + RSS_BASELINE_AT * (window[-1].t - window[0].t)
    base = min(window, key=lambda s: abs(s.t - at))
    end = window[-1]
    return {
        name: (base.procs[name].rss / MB, end.procs[name].rss / MB)
        for name in base.procs
        if name in end.procs
        and name.split("#")[0] not in ("simulator", "bench")
        and not name.endswith("*")  # shared servers
    }


# --- the runs -----------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.run_id = secrets.token_hex(3)
        self.database: Database | None = None
        self.platform: Platform | None = None
        self.prefixes: list[str] = []

    async def fresh_platform(self, actors: int) -> tuple[JetStreamContext, str]:
        """A new database and platform: (its JetStream, an administrator's API key)."""
        await self.close_platform()
        run_dir = self.tmp / f"run-{actors}-{secrets.token_hex(2)}"
        run_dir.mkdir()
        self.database = await Database.create(self.args.database_url, run_dir)
        await self.database.migrate()
        key = await self.database.admin_api_key()
        a = self.args
        self.platform = Platform(run_dir, self.database.url, a.redis_url, actors, a.nats_max_store)
        js = await self.platform.start()
        return js, key

    async def close_platform(self) -> None:
        if self.platform is not None:
            await self.platform.stop()
            self.platform = None
        if self.args.redis_url and self.prefixes:
            with contextlib.suppress(Exception):
                await forget_cached_state(self.args.redis_url, self.prefixes)
        if self.database is not None:
            try:
                await self.database.drop()
            except Exception as exc:
                print(f"soak: could not drop {self.database.url}: {exc}")
            self.database = None

    def header(self, what: str) -> None:
        assert self.platform is not None and self.database is not None
        print(
            f"\n{what}; database {self.database.kind}; cache "
            f"{'Redis' if self.args.redis_url else 'in-process'}; {os.cpu_count()} CPUs; "
            f"{self.platform.note}; load average {os.getloadavg()[0]:.2f}",
            flush=True,
        )

    async def soak(self) -> None:
        a = self.args
        js, key = await self.fresh_platform(a.actor_processes)
        assert self.platform is not None and self.platform.nc is not None
        prefix = f"soak-{self.run_id}"
        self.prefixes.append(prefix)
        probe = LatencyProbe()
        await probe.subscribe(self.platform.nc, sample_devices(prefix, a.devices, a.sample))
        self.header(
            f"soak: {a.devices:,} devices, one reading per {a.interval:g} s "
            f"({a.devices / a.interval:,.0f} events/s), {a.minutes:g} min; simulator at nice "
            f"{a.simulator_nice}"
        )
        sim = simulator(
            self.platform, prefix, a.devices, a.interval, a.minutes * 60, key, a.simulator_nice
        )
        run = await load_run(
            js, self.platform, sim, a.sample_every, a.interval, a.minutes * 60, probe
        )
        drained = await drain(js, self.platform, DRAIN_TIMEOUT_S)
        assert self.platform.tree is not None
        last = run.samples[-1].t + drained
        run.samples.append(await take_sample(js, self.platform.tree, last, "drain"))
        print()
        print_samples(run.samples)
        await self.judge(js, run, sim, probe, prefix, drained)
        await self.storage(js, run, prefix)

    async def judge(
        self,
        js: JetStreamContext,
        run: LoadRun,
        sim: Child,
        probe: LatencyProbe,
        prefix: str,
        drained: float,
    ) -> None:
        a = self.args
        print(
            f"\nregistered {a.devices:,} devices in {run.registered_s:.1f} s; load window "
            f"{run.load_from:.0f}-{run.load_until:.0f} s at {run.rate():,.0f} events/s; "
            f"drained {drained:.1f} s after the simulator stopped"
        )
        if len(run.window()) < 2:
            raise BenchError(
                f"no load window to judge: the hellos lasted past the end of the load (give "
                f"more than --minutes {a.minutes:g}, or sample more often than every "
                f"{a.sample_every:g} s)"
            )
        registering = [s for s in run.samples if s.phase == "register"]
        print(
            f"CPU % while registering (mean of {len(registering)} samples): {mean_cpu(registering)}"
        )
        print(f"CPU % under load (mean of {len(run.window())} samples): {mean_cpu(run.window())}")
        print(
            "CPU wait % under load (ready to run, no CPU free; % of one core): "
            f"{mean_cpu(run.window(), wait=True)}"
        )
        growth = run.lag_growth()
        verdict(
            "lag flat",
            run.lag_flat(),
            f"total lag grew by {growth:,.0f} events over the load window (least squares; "
            f"flat: ≤ 1 s of input, {max(run.rate(), 100):,.0f}); max "
            f"{max(s.lag for s in run.window()):,} (actors max "
            f"{max(actors_lag(s.lags) for s in run.window()):,})",
        )
        lat = probe.latencies_ms()
        if lat:
            p50, p99 = percentile(lat, 50), percentile(lat, 99)
            verdict(
                "p99 event → state fact",
                p99 <= P99_TARGET_MS,
                f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {lat[-1]:.1f} ms over {len(lat):,} "
                f"events of {a.sample} sensors (target ≤ {P99_TARGET_MS:g} ms); "
                f"{len(probe.sent) - len(lat)} without a fact",
            )
            by_window = probe.p99_by_window(LATENCY_WINDOW_S)
            print(
                f"      p99 of each {LATENCY_WINDOW_S:g} s: "
                + " ".join(f"{ms:.0f}" for ms in by_window)
            )
            if a.latency_csv:
                with open(a.latency_csv, "w") as out:
                    out.write("seen_s,latency_ms\n")
                    out.writelines(f"{t:.4f},{ms:.3f}\n" for t, ms in probe.timeline())
        else:
            verdict("p99 event → state fact", False, "no state fact matched")
        growths = rss_growth(run, a.minutes)
        worst = max(growths.items(), key=lambda kv: kv[1][1] / kv[1][0], default=None)
        detail = ", ".join(f"{n} {b:.0f}→{e:.0f} MB" for n, (b, e) in sorted(growths.items()))
        ok = worst is not None and worst[1][1] <= worst[1][0] * (1 + RSS_GROWTH_TARGET)
        verdict(
            f"RSS at the end within {RSS_GROWTH_TARGET:.0%} of minute {a.minutes * 0.2:g}",
            ok,
            detail,
        )
        dead = await stream_count(js, subjects.DEADLETTER_STREAM)
        verdict("nothing dead-lettered", dead == 0, f"{dead} dead letters")
        acked = await stream_count(js, subjects.EVENTS_STREAM)
        rows = await history_rows(self.database.url, prefix)  # type: ignore[union-attr]
        sim_acked = simulator_acked(sim)
        verdict(
            "history rows = events acknowledged",
            rows == acked,
            f"{rows:,} history rows of EVENTS, {acked:,} events stored by the stream, "
            f"{sim_acked if sim_acked is not None else '?'} acknowledged to the simulator",
        )

    async def storage(self, js: JetStreamContext, run: LoadRun, prefix: str) -> None:
        """What the run stored, per event and per device: the capacity plan's inputs."""
        assert self.database is not None and self.platform is not None
        print("\nstorage (the capacity plan's inputs):")
        for stream in (subjects.EVENTS_STREAM, subjects.SYSTEM_STREAM):
            state = (await js.stream_info(stream)).state
            per = state.bytes / state.messages if state.messages else 0
            print(
                f"  {stream}: {state.messages:,} messages, {state.bytes:,} bytes, {per:,.0f} B each"
            )
        if self.database.server_url:
            for table in ("history", "device_states", "statistics"):
                size, rows = await table_size(self.database.url, table)
                per = size / rows if rows else 0
                print(f"  Postgres {table}: {rows:,} rows, {size:,} bytes, {per:,.0f} B a row")
        if self.args.redis_url:
            used = await redis_key_bytes(self.args.redis_url, prefix, 200)
            print(f"  Redis: {used:,.0f} B a device state (MEMORY USAGE, mean of 200 keys)")
        window = run.window()
        cpu: dict[str, float] = {}
        for s in window:
            for name, got in s.procs.items():
                cpu[name] = cpu.get(name, 0.0) + got.cpu / len(window)
        rate = run.rate()
        if rate:
            costs = ", ".join(
                f"{n} {v / 100 / rate * 1000:.3f}" for n, v in sorted(cpu.items()) if v >= 0.5
            )
            print(
                f"  CPU per event acknowledged (ms of a core), mean over the load window at "
                f"{rate:,.0f} events/s: {costs}"
            )

    async def step(self) -> None:
        a = self.args
        results: list[str] = []
        for actors in a.step_processes:
            js, key = await self.fresh_platform(actors)
            assert self.platform is not None
            prefix = f"step-{self.run_id}-{actors}"
            self.prefixes.append(prefix)
            self.header(f"step: {a.devices:,} devices, {a.step_seconds:g} s a step")
            best = 0.0
            rate = a.step_start
            while rate <= a.step_max:
                interval = a.devices / rate
                sim = simulator(self.platform, prefix, a.devices, interval, a.step_seconds, key)
                run = await load_run(
                    js, self.platform, sim, a.sample_every, interval, a.step_seconds
                )
                achieved = run.rate()
                flat = run.lag_flat()
                cpu = step_cpu(run)
                line = (
                    f"{actors} actors: target {rate:,.0f}/s achieved {achieved:,.0f}/s, "
                    f"lag growth {run.lag_growth():,.0f} → {'flat' if flat else 'GROWS'}; "
                    f"CPU % {cpu}; load {run.window()[-1].load1 if run.window() else 0:.2f}"
                )
                print(line, flush=True)
                results.append(line)
                if flat:  # what was applied with the lag flat, reached or not
                    best = max(best, achieved)
                if not flat or achieved < 0.9 * rate:
                    why = (
                        f"the lag grew at {rate:,.0f}/s"
                        if not flat
                        else f"the simulator reached {achieved:,.0f} of {rate:,.0f}/s"
                    )
                    break
                await drain(js, self.platform, DRAIN_TIMEOUT_S)
                rate *= a.step_factor
            else:
                why = f"--step-max {a.step_max:,.0f} reached"
            summary = (
                f"{actors} actors processes: highest sustained {best:,.0f} events/s "
                f"(stopped: {why})"
            )
            print(summary, flush=True)
            results.append(summary)
        print("\n" + "\n".join(results))


def step_cpu(run: LoadRun) -> str:
    """Each process's mean CPU % over a step's window."""
    return mean_cpu(run.window())


def mean_cpu(window: list[Sample], wait: bool = False) -> str:
    """Each process's mean CPU % (of one core) over some samples (`wait`: the time it
    waited for a CPU instead)."""
    names = sorted({n for s in window for n in s.procs})
    means = {
        n: sum(s.procs[n].wait if wait else s.procs[n].cpu for s in window if n in s.procs)
        / max(1, len(window))
        for n in names
    }
    return ", ".join(f"{n} {v:.0f}" for n, v in means.items() if v >= 0.5)


async def history_rows(database_url: str, prefix: str) -> int:
    engine = make_engine(database_url)
    try:
        async with engine.connect() as conn:
            found = await conn.execute(
                text("SELECT count(*) FROM history WHERE stream = :s AND device_id LIKE :p"),
                {"s": subjects.EVENTS_STREAM, "p": f"{prefix}-%"},
            )
            return int(found.scalar_one())
    finally:
        await engine.dispose()


async def table_size(database_url: str, table: str) -> tuple[int, int]:
    """(bytes with indexes and TOAST, rows) of a Postgres table."""
    engine = make_engine(database_url)
    try:
        async with engine.connect() as conn:
            size = await conn.execute(text("SELECT pg_total_relation_size(:t)"), {"t": table})
            rows = await conn.execute(text(f"SELECT count(*) FROM {table}"))
            return int(size.scalar_one()), int(rows.scalar_one())
    finally:
        await engine.dispose()


async def redis_key_bytes(redis_url: str, prefix: str, count: int) -> float:
    """Mean `MEMORY USAGE` of up to `count` of this run's device-state keys."""
    client = redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        sizes = []
        async for key in client.scan_iter(f"{KEY_PREFIX}{prefix}-*", count=1000):
            sizes.append(int(await client.memory_usage(key) or 0))
            if len(sizes) >= count:
                break
        return sum(sizes) / len(sizes) if sizes else 0.0
    finally:
        await client.aclose()


async def forget_cached_state(redis_url: str, prefixes: list[str]) -> None:
    """This run's devices' state keys, and only those."""
    client = redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        for prefix in prefixes:
            keys = [k async for k in client.scan_iter(f"{KEY_PREFIX}{prefix}-*", count=1000)]
            for start in range(0, len(keys), 500):
                await client.delete(*keys[start : start + 500])
    finally:
        await client.aclose()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument("--interval", type=float, default=10.0, help="seconds between readings")
    p.add_argument("--minutes", type=float, default=10.0, help="of load, after registering")
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--sample", type=int, default=200, help="sensors whose latency is measured")
    p.add_argument("--actor-processes", type=int, default=1)
    p.add_argument(
        "--simulator-nice",
        type=int,
        default=SIMULATOR_NICE,
        help="niceness added to the simulator's in the soak (0: it competes with the platform; "
        "--step runs it as the platform, to reach its rates)",
    )
    p.add_argument(
        "--latency-csv", help="write each sampled event's time and latency (ms) to this file"
    )
    p.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    p.add_argument(
        "--nats-max-store",
        help="the bus's store (SMARTHOME_NATS_MAX_STORE, e.g. 1GB): its streams' byte budgets "
        "are shares of it, so that they fill and drop their oldest within the run",
    )
    p.add_argument("--step", action="store_true", help="find the highest sustained rate")
    p.add_argument("--step-seconds", type=float, default=120.0)
    p.add_argument("--step-start", type=float, default=500.0, help="events/s of the first step")
    p.add_argument("--step-factor", type=float, default=1.5)
    p.add_argument("--step-max", type=float, default=50_000.0)
    p.add_argument(
        "--step-processes",
        type=lambda v: [int(n) for n in v.split(",")],
        default=[1, 2],
        help="actors processes of each step series, e.g. 1,2",
    )
    args = p.parse_args(argv)
    if args.devices < 1 or args.interval <= 0 or args.minutes <= 0:
        p.error("--devices, --interval and --minutes must be above 0")
    return args


async def amain(args: argparse.Namespace, tmp: Path) -> None:
    soak = Soak(args, tmp)
    cancel_on_sigterm()
    try:
        await (soak.step() if args.step else soak.soak())
    finally:
        await soak.close_platform()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="smarthome-soak-"))
    try:
        asyncio.run(amain(args, tmp))
    except BenchError as exc:
        print(f"\nsoak: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("soak: stopped", file=sys.stderr)
        return 130
    finally:
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
