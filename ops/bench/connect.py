"""Devices connecting with credentials: how fast the bus admits them through its auth callout.

    .venv/bin/python ops/bench/connect.py [--devices 1000] [--first-events 100]
                                          [--database-url URL]

It starts a nats-server of its own with the platform's authorization (no anonymous user,
the services as static users, everyone else through the callout), a fresh database with
D registered devices and their bus credentials (SHA-256 of 256-bit secrets, as the gateway
stores them), and the real `python -m services.busauth`. The figures:

- **(a) 1,000 devices connecting at once**: D NATS connections opened together (each its
  own id and password, each answered by the callout: registry read, user JWT signed);
  connections per second from the first attempt to the last CONNECT accepted, and the p50 /
  p99 of one connection. Beside it, in the same run, the **baseline**: D connections of a
  static user (the server's own bcrypt check, no callout), and the ratio.
- **(b) reconnect storm after a bus restart**: with the D devices connected, nats-server is
  stopped and started again on the same port; the time from the restarted server listening
  until every device has reconnected through the callout, as reconnections per second.
- **(c) time to first accepted event**: a device connects and publishes one event to
  JetStream, one device after another; p50 / p99 from the connect to the stream's ack.
  Baseline: the same with a static user.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import nats
from harness import (
    BenchError,
    Child,
    Database,
    Results,
    cancel_on_sigterm,
    percentile,
    run_bench,
    service_env,
)
from nats.aio.client import Client as NATS

from libs import bus, bus_auth, bus_grants, embedded_nats, subjects
from libs import messages as m
from libs.db.engine import make_engine, make_sessionmaker
from libs.db.models import Bridge, BridgeDevice, BusCredential, Device
from libs.passwords import digest

# The callout admits devices at least 80% as fast as the server admits its static users.
CONNECT_RATIO_TARGET = 0.8
STORM_TARGET_S = 10.0  # every device back after a bus restart
FIRST_EVENT_P99_TARGET_MS = 100.0


class Run:
    def __init__(self, args: argparse.Namespace, tmp: Path, results: Results) -> None:
        self.args = args
        self.tmp = tmp
        self.results = results
        self.run_id = secrets.token_hex(3)
        self.devices = {
            f"conn-{self.run_id}-{i:05d}": secrets.token_urlsafe(32) for i in range(args.devices)
        }
        self.children: list[Child] = []
        self.database: Database | None = None
        self.port = embedded_nats.free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.nats: Child | None = None
        self.passwords: dict[str, bus_grants.ServicePassword] = {}

    def start_bus(self) -> None:
        auth = bus_auth.embedded_authorization(self.tmp / "data" / "bus")
        log = self.tmp / "nats-server.log"
        proc = embedded_nats.start(self.tmp / "nats", self.port, log, auth=auth)
        self.nats = Child("nats-server", list(map(str, proc.args)), {}, log)
        self.nats.proc = proc
        self.children.append(self.nats)

    async def setup(self) -> None:
        self.passwords = bus_grants.ensure_service_passwords(self.tmp / "data" / "bus")
        await asyncio.to_thread(self.start_bus)
        self.database = await Database.create(self.args.database_url, self.tmp)
        await self.database.migrate()
        engine = make_engine(self.database.url)
        try:
            async with make_sessionmaker(engine).begin() as session:
                for device_id, password in self.devices.items():
                    session.add(Device(id=device_id, name=device_id, kind="sensor"))
                    session.add(
                        BusCredential(
                            identity=device_id, secret_hash=digest(password), issued_by="bench"
                        )
                    )
        finally:
            await engine.dispose()
        operator = await self.static_connect("operator")
        await bus.ensure_streams(operator.jetstream())
        await operator.drain()
        env = {
            **service_env(self.url, self.database.url, self.tmp / "data", None),
            **bus_grants.service_env(self.passwords, "busauth"),
        }
        port = embedded_nats.free_port()
        env["SMARTHOME_HEALTH_PORT"] = str(port)
        busauth = Child(
            "busauth",
            [sys.executable, "-m", "services.busauth"],
            env,
            self.tmp / "busauth.log",
            port,
        )
        self.children.append(busauth)
        await asyncio.to_thread(busauth.start, f"http://127.0.0.1:{port}/health/ready")

    async def static_connect(self, user: str, **options: object) -> NATS:
        return await nats.connect(
            self.url,
            user=user,
            password=self.passwords[user].password,
            inbox_prefix=bus_grants.inbox_prefix("svc", user),
            connect_timeout=30,
            **options,  # type: ignore[arg-type]
        )

    async def device_connect(self, device_id: str, **options: object) -> NATS:
        return await nats.connect(
            self.url,
            user=device_id,
            password=self.devices[device_id],
            inbox_prefix=subjects.device_inbox(device_id),
            connect_timeout=30,
            error_cb=_quiet,  # a bus restarting on purpose is no news
            **options,  # type: ignore[arg-type]
        )

    async def teardown(self) -> None:
        for child in reversed(self.children):
            await asyncio.to_thread(child.stop)
        if self.database is not None:
            await self.database.drop()

    # -- figures ------------------------------------------------------------------------

    async def at_once(
        self, connect: partial[object], count: int
    ) -> tuple[float, list[float], list[NATS]]:
        """`count` connections opened together: (per second, each one's seconds, them)."""

        async def one(n: int) -> tuple[float, NATS]:
            began = time.perf_counter()
            nc = await connect(n)  # type: ignore[misc]
            return time.perf_counter() - began, nc

        began = time.perf_counter()
        done = await asyncio.gather(*(one(n) for n in range(count)))
        elapsed = time.perf_counter() - began
        return count / elapsed, sorted(d for d, _ in done), [nc for _, nc in done]

    async def run(self) -> None:
        await self.setup()
        r, n = self.results, len(self.devices)
        assert self.database is not None
        r.header.append(
            f"{n:,} devices with credentials; database {self.database.kind}; one busauth "
            f"process; nats-server {self.url} with auth callout; bench pid {os.getpid()}"
        )
        ids = list(self.devices)

        # (a) baseline first: static users, the server's own check.
        static = partial(lambda _n: self.static_connect("operator", allow_reconnect=False))
        base_rate, base_times, base_conns = await self.at_once(static, n)  # type: ignore[arg-type]
        for nc in base_conns:
            await nc.close()
        reconnected: asyncio.Queue[str] = asyncio.Queue()

        def device(i: int) -> object:
            device_id = ids[i]

            async def on_reconnect() -> None:
                reconnected.put_nowait(device_id)

            return self.device_connect(
                device_id, reconnected_cb=on_reconnect, max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
            )  # fmt: skip

        rate, times, conns = await self.at_once(partial(device), n)  # type: ignore[arg-type]
        r.add(
            f"(a) {n:,} devices connecting at once (auth callout): conn/s; p50 / p99",
            f"{rate:,.0f}/s; {_ms(times)}",
        )
        r.add(
            f"(a) baseline: {n:,} static-user connections at once: conn/s; p50 / p99",
            f"{base_rate:,.0f}/s; {_ms(base_times)}",
        )
        r.add(
            "(a) callout / baseline",
            f"{rate / base_rate:.2f}",
            f"≥ {CONNECT_RATIO_TARGET:g}",
            rate / base_rate >= CONNECT_RATIO_TARGET,
        )

        # (b) the bus restarts under them.
        assert self.nats is not None and self.nats.proc is not None
        self.nats.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(self.nats.proc.wait, 30)
        await asyncio.to_thread(self.start_bus)
        back = time.perf_counter()
        seen: set[str] = set()
        try:
            while len(seen) < n:
                seen.add(await asyncio.wait_for(reconnected.get(), timeout=60))
        except TimeoutError:
            raise BenchError(f"only {len(seen)} of {n} devices reconnected within 60 s") from None
        storm = time.perf_counter() - back
        r.add(
            f"(b) reconnect storm after a bus restart: all {n:,} back in; reconn/s",
            f"{storm:.2f} s; {n / storm:,.0f}/s",
            f"≤ {STORM_TARGET_S:g} s",
            storm <= STORM_TARGET_S,
        )
        for nc in conns:
            await nc.close()

        # (c) connect → first event acknowledged by the stream, one device after another.
        async def first_event(connect: object, device_id: str) -> float:
            began = time.perf_counter()
            nc = await connect()  # type: ignore[operator]
            event = m.make_event(device_id, "hello", {})
            await nc.jetstream().publish(event.nats_subject, m.encode(event))
            took = time.perf_counter() - began
            await nc.close()
            return took

        count = min(self.args.first_events, n)
        firsts = sorted(
            [await first_event(partial(self.device_connect, d), d) for d in ids[:count]]
        )
        bases = sorted(
            [await first_event(partial(self.static_connect, "operator"), d) for d in ids[:count]]
        )
        p99 = percentile(firsts, 99) * 1000
        r.add(
            f"(c) connect → first event acked, {count} devices: p50 / p99",
            f"{percentile(firsts, 50) * 1000:.1f} / {p99:.1f} ms",
            f"p99 ≤ {FIRST_EVENT_P99_TARGET_MS:g} ms",
            p99 <= FIRST_EVENT_P99_TARGET_MS,
        )
        r.add(
            "(c) baseline: a static user, the same: p50 / p99",
            f"{percentile(bases, 50) * 1000:.1f} / {percentile(bases, 99) * 1000:.1f} ms",
        )
        r.add(
            "(c) callout / baseline (p50)", f"{percentile(firsts, 50) / percentile(bases, 50):.2f}"
        )
        await self.bridge()

    async def bridge(self) -> None:
        """(d) one bridge connection speaking for `--bridge-devices` devices of a home: its
        user JWT lists each one's subjects (the callout answer must fit max_payload, 1 MB)."""
        count = self.args.bridge_devices
        bridge_id, password = f"hub-{self.run_id}", secrets.token_urlsafe(32)
        members = [f"{bridge_id}-{i:05d}" for i in range(count)]
        assert self.database is not None
        engine = make_engine(self.database.url)
        try:
            async with make_sessionmaker(engine).begin() as session:
                session.add(Bridge(id=bridge_id, name=bridge_id, home="bench", created_by="bench"))
                session.add(
                    BusCredential(
                        identity=f"bridge:{bridge_id}",
                        secret_hash=digest(password),
                        issued_by="bench",
                    )
                )
                await session.flush()
                for d in members:
                    session.add(Device(id=d, name=d, kind="sensor", location="bench/hall"))
                    session.add(BridgeDevice(device_id=d, bridge_id=bridge_id))
        finally:
            await engine.dispose()
        began = time.perf_counter()
        nc = await nats.connect(
            self.url,
            user=f"bridge:{bridge_id}",
            password=password,
            inbox_prefix=subjects.inbox_prefix("bridge", bridge_id),
            connect_timeout=30,
        )
        connected = time.perf_counter() - began
        try:
            js = nc.jetstream()
            for d in (members[0], members[-1]):
                event = m.make_event(d, "telemetry", {"n": 1})
                await js.publish(event.nats_subject, m.encode(event))
            await nc.subscribe(subjects.commands(members[-1]))
            await nc.flush()
        finally:
            await nc.close()
        self.results.add(
            f"(d) one bridge connection for {count:,} devices: connect, callout included",
            f"{connected * 1000:.0f} ms",
        )


async def _quiet(_exc: Exception) -> None:
    pass


def _ms(seconds: list[float]) -> str:
    return f"{percentile(seconds, 50) * 1000:.0f} / {percentile(seconds, 99) * 1000:.0f} ms"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--first-events", type=int, default=100)
    parser.add_argument("--bridge-devices", type=int, default=10_000)
    parser.add_argument("--database-url", help="a Postgres server (default SQLite)")
    args = parser.parse_args(argv)
    if args.devices < 1 or args.first_events < 1:
        parser.error("--devices and --first-events must be at least 1")
    return args


async def amain(args: argparse.Namespace, tmp: Path, results: Results) -> None:
    run = Run(args, tmp, results)
    cancel_on_sigterm()
    try:
        await run.run()
    finally:
        await run.teardown()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="smarthome-bench-connect-"))
    results = Results()
    keep = bool(os.environ.get("BENCH_KEEP"))
    return run_bench(amain(args, tmp, results), tmp, results, keep=keep)


if __name__ == "__main__":
    sys.exit(main())
