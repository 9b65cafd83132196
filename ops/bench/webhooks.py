"""Webhook delivery benchmark: deliveries per second per subscription; prints a table; not a test.

    python ops/bench/webhooks.py [--subscriptions 10] [--events 5000] [--mode structured]
                                 [--batch-size 100] [--rate 0]

It starts a nats-server of its own (free port, temporary directory), a fresh SQLite database,
S subscriptions on one filter (`events.*.telemetry`: rows and consumers made as the gateway
makes them), S HTTP receivers in this process (raw asyncio protocols, keep-alive, 204), and
`python -m services.webhooks`. With `--rate 0` (the default) E events are in the stream before
the service starts: the figure is how fast it drains them, per subscription. With `--rate R`
they are published at R/s after it started (on an absolute schedule): the figure is then
whether each subscription keeps up. Every receiver checks that it got every event once, in
order. The machine is shared: figures are noisy, run it more than once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

import msgspec
import nats
import psutil
from harness import (
    BenchError,
    Child,
    Database,
    Results,
    percentile,
    print_table,
    service_env,
)
from sqlalchemy.ext.asyncio import create_async_engine

from libs import bus, embedded_nats, subjects, webhooks
from libs import messages as m
from libs.db.engine import make_sessionmaker
from libs.db.models import Subscription

FILTER = "events.*.telemetry"
DEVICES = 10

_HEADER_END = b"\r\n\r\n"
_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)
_OK = b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n"


class Id(msgspec.Struct):
    id: str


ids_decoder = msgspec.json.Decoder(list[Id])
id_decoder = msgspec.json.Decoder(Id)


class Receiver(asyncio.Protocol):
    """HTTP/1.1 keep-alive endpoint: records the event ids of each request and when."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self._buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.sink.connections += 1

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(_HEADER_END)) >= 0:
            length = _LENGTH.search(self._buffer[: end + 2])
            total = end + 4 + (int(length[1]) if length else 0)
            if len(self._buffer) < total:
                return
            self.sink.take(self._buffer[end + 4 : total])
            self._buffer = self._buffer[total:]
            assert self.transport is not None
            self.transport.write(_OK)


class Sink:
    def __init__(self) -> None:
        self.ids: list[str] = []
        self.times: list[float] = []
        self.requests = 0
        self.connections = 0
        self.first = 0.0
        self.last = 0.0

    def take(self, body: bytes) -> None:
        now = time.monotonic()
        if not self.requests:
            self.first = now
        self.last = now
        self.requests += 1
        if body.startswith(b"["):
            self.ids.extend(e.id for e in ids_decoder.decode(body))
        else:
            self.ids.append(id_decoder.decode(body).id)
        self.times.extend([now] * (len(self.ids) - len(self.times)))


async def run(args: argparse.Namespace, tmp: Path, results: Results) -> None:
    port = embedded_nats.free_port()
    nats_log = tmp / "nats-server.log"
    proc = embedded_nats.start(tmp / "nats", port, nats_log)
    service: Child | None = None
    nc = None
    published: dict[str, float] = {}
    publish_rate = 0.0
    try:
        nats_url = f"nats://127.0.0.1:{port}"
        database = await Database.create(None, tmp)
        await database.migrate()
        nc = await nats.connect(nats_url, name="bench")
        js = nc.jetstream()
        await bus.ensure_streams(js)

        loop = asyncio.get_running_loop()
        sinks = [Sink() for _ in range(args.subscriptions)]
        servers = [await loop.create_server(lambda s=s: Receiver(s), "127.0.0.1", 0) for s in sinks]
        batch_size = args.batch_size if args.mode == "batched" else None
        engine = create_async_engine(database.url)
        sessions = make_sessionmaker(engine)
        async with sessions.begin() as session:
            for server in servers:
                row = Subscription(
                    id=m.new_id(),
                    filter=FILTER,
                    url=f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook",
                    mode=args.mode,
                    batch_size=batch_size,
                    secret=webhooks.new_secret(),
                    enabled=True,
                    created_by="bench",
                    # Made by an administrator: its receiver on loopback is inside the allow-nets.
                    private_targets=True,
                    created_at=m.now(),
                    delivered_count=0,
                )
                session.add(row)
                await js.add_consumer(
                    subjects.EVENTS_STREAM,
                    webhooks.consumer_config(row.id, FILTER, 20.0, batch_size),
                )
                await js.add_consumer(
                    subjects.SYSTEM_STREAM,
                    webhooks.notify_consumer_config(row.id, 20.0, batch_size),
                )
        await engine.dispose()

        events = [
            m.make_event(f"bench-{n % DEVICES}", "telemetry", {"n": n}) for n in range(args.events)
        ]
        messages = [(e.nats_subject, e, e.id) for e in events]
        if not args.rate:
            for start in range(0, len(messages), 1000):
                await bus.publish_many(js, messages[start : start + 1000])

        env = service_env(nats_url, database.url, tmp / "data", None)
        health = embedded_nats.free_port()
        env.update(
            SMARTHOME_WEBHOOK_ALLOW_NETS="127.0.0.0/8",
            SMARTHOME_LOG_LEVEL="WARNING",
            SMARTHOME_HEALTH_PORT=str(health),
        )
        service = Child(
            "webhooks", [sys.executable, "-m", "services.webhooks"], env, tmp / "webhooks.log"
        )
        await asyncio.to_thread(service.start, f"http://127.0.0.1:{health}/health/ready")
        ps = psutil.Process(service.pid)
        cpu_before = sum(ps.cpu_times()[:2])
        started = time.monotonic()
        if args.rate:
            acks = []
            for n, (subject, event, msg_id) in enumerate(messages):
                delay = started + n / args.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                published[msg_id] = time.monotonic()
                payload = msgspec.json.encode(event)
                acks.append(await js.publish_async(subject, payload, headers={bus.MSG_ID: msg_id}))
            await asyncio.wait_for(asyncio.gather(*acks), 30)
            publish_rate = len(messages) / (time.monotonic() - started)
        expected = len(events)
        deadline = time.monotonic() + args.timeout
        while any(len(s.ids) < expected for s in sinks) and time.monotonic() < deadline:
            service.check_alive()
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - started
        cpu = sum(ps.cpu_times()[:2]) - cpu_before
    finally:
        if service is not None:
            await asyncio.to_thread(service.stop)
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
        proc.terminate()
        proc.wait(10)

    order = [e.id for e in events]
    rates = [len(s.ids) / (s.last - s.first) if s.last > s.first else 0.0 for s in sinks]
    in_order = sum(1 for s in sinks if s.ids == order)
    delivered = sum(len(s.ids) for s in sinks)
    requests = sum(s.requests for s in sinks)
    what = f"{args.mode}" + (f", batch_size {args.batch_size}" if batch_size else "")
    results.header.append(
        f"{args.subscriptions} subscriptions on `{FILTER}` ({what}); {args.events:,} events "
        + (f"published at {args.rate:,}/s" if args.rate else "in the stream before the start")
        + f"; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} after"
    )
    results.add("(a) delivered / expected", f"{delivered:,} / {expected * len(sinks):,}")
    results.add(
        "(b) per subscription: events delivered/s min / median / max",
        " / ".join(f"{r:,.0f}" for r in (min(rates), statistics.median(rates), max(rates))),
    )
    results.add("(c) all subscriptions: events delivered/s", f"{delivered / elapsed:,.0f}")
    results.add(
        "(d) requests (events per request)", f"{requests:,} ({delivered / max(requests, 1):.1f})"
    )
    results.add("(e) receivers with every event once, in order", f"{in_order} of {len(sinks)}")
    if args.rate:
        lags = sorted(
            (at - published[i]) * 1000 for s in sinks for i, at in zip(s.ids, s.times, strict=True)
        )
        results.add("(h) publish rate achieved", f"{publish_rate:,.0f} events/s")
        results.add(
            "(i) publish → receipt p50 / p99 / max",
            f"{percentile(lags, 50):,.1f} / {percentile(lags, 99):,.1f} / {lags[-1]:,.0f} ms",
        )
    results.add("(f) HTTP connections opened", f"{sum(s.connections for s in sinks)}")
    results.add("(g) webhooks service CPU (% of one core)", f"{100 * cpu / elapsed:.0f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscriptions", type=int, default=10)
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--mode", choices=["structured", "binary", "batched"], default="structured")
    parser.add_argument("--batch-size", type=int, default=webhooks.DEFAULT_BATCH_SIZE)
    parser.add_argument("--rate", type=int, default=0, help="events/s; 0: all before the start")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-webhooks-"))
    results = Results()
    try:
        asyncio.run(run(args, tmp, results))
    except BenchError as exc:
        sys.exit(f"bench: {exc}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(results)


if __name__ == "__main__":
    main()
