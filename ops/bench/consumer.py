"""The consumer runtime's own cost: CPU per message of a `libs.consumer.Consumer` draining
pre-published messages with a trivial decoder and handler, against a raw nats-py
pull-subscribe fetch loop (one ack per batch, AckPolicy.ALL) drained the same way in the
same run: the runtime's overhead is the ratio. Then the runtime alone, without the bus:
its per-message code (`Puller`'s arrival, `Consumer`'s batch: parse, deliveries, decode,
items, settle plan) on stand-in deliveries whose ack does nothing: steadier than the rest.

    .venv/bin/python -m ops.bench.consumer [--messages 20000] [--batches 1,16,256,500]
        [--rounds 2] [--no-raw]

Starts a nats-server of its own (the wheel's, on a free port, in a scratch directory) and
stops it at the end. CPU is this process's (`time.process_time`): the client's side only,
the server's is not counted. Figures are noisy on a shared machine: say the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from libs import embedded_nats
from libs.consumer import Consumer, Delivery, Item
from libs.pull import Puller

STREAM = "BENCH"
SUBJECT = "bench.x"
PAYLOAD = b'{"kind":"reading","value":21.5}'
# Fewer messages for batches of one: a round trip each, raw and runtime alike.
SMALL_BATCH_MESSAGES = 2_000


@dataclass(frozen=True)
class Figure:
    messages: int
    wall_s: float
    cpu_s: float

    @property
    def rate(self) -> float:
        return self.messages / self.wall_s

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / self.messages * 1e6


async def publish(js: JetStreamContext, nc: NATS, n: int) -> None:
    """`n` messages stored on a fresh stream: core publishes, then one acked by the stream
    (stored after all the others: one connection keeps their order)."""
    await js.add_stream(StreamConfig(name=STREAM, subjects=["bench.>"]))
    for i in range(n - 1):
        await nc.publish(SUBJECT, PAYLOAD)
        if i % 1000 == 999:
            await nc.flush()
    await js.publish(SUBJECT, PAYLOAD)
    stored = (await js.stream_info(STREAM)).state.messages
    if stored != n:
        raise RuntimeError(f"{stored} of {n} messages stored")


def config(durable: str) -> ConsumerConfig:
    return ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.ALL, max_ack_pending=20_000)


async def raw(nc: NATS, js: JetStreamContext, durable: str, n: int, batch: int) -> Figure:
    """The baseline: nats-py's pull subscription, `fetch(batch)`, the last message acked."""
    await js.add_consumer(STREAM, config(durable))
    psub = await js.pull_subscribe_bind(durable, STREAM)
    got = 0
    wall, cpu = time.perf_counter(), time.process_time()
    while got < n:
        msgs = await psub.fetch(batch, timeout=5)
        for msg in msgs:
            _ = msg.metadata.sequence.stream  # what any reader needs at least
        got += len(msgs)
        await msgs[-1].ack()
    await nc.flush()
    figure = Figure(got, time.perf_counter() - wall, time.process_time() - cpu)
    await psub.unsubscribe()
    return figure


async def runtime(nc: NATS, js: JetStreamContext, durable: str, n: int, batch: int) -> Figure:
    """The runtime: `Consumer` with a trivial decoder and handler, until all `n` are handled."""
    await js.add_consumer(STREAM, config(durable))
    got = 0
    done = asyncio.Event()
    stop = asyncio.Event()

    def decode(d: Delivery) -> bytes:
        return d.data

    async def handle(items: list[Item[Any]]) -> None:
        nonlocal got
        got += len(items)
        if got >= n:
            done.set()
            stop.set()

    consumer = Consumer(nc, STREAM, config(durable), decode, handle, batch=batch, wait=1.0)
    wall, cpu = time.perf_counter(), time.process_time()
    task = asyncio.create_task(consumer.run(stop))
    await asyncio.wait_for(done.wait(), 600)
    await task  # the last ack flushed
    return Figure(got, time.perf_counter() - wall, time.process_time() - cpu)


class Unacked(Msg):
    """A delivery whose ack goes nowhere (the runtime alone)."""

    async def ack(self) -> None:
        return None


async def alone(nc: NATS, n: int, batch: int) -> Figure:
    """The runtime's per-message code without the bus: arrivals as `Puller` takes them,
    batches as `Consumer` handles them (private methods: this measures exactly them)."""
    msgs = [
        Unacked(
            nc,
            subject=f"events.d{i % 50}.reading.{i % 4}",
            reply=f"$JS.ACK.{STREAM}.alone.1.{i + 1}.{i + 1}.1796584292542264099.{n - i - 1}",
            data=PAYLOAD,
        )
        for i in range(n)
    ]
    got = 0

    async def handle(items: list[Item[Any]]) -> None:
        nonlocal got
        got += len(items)

    consumer = Consumer(nc, STREAM, config("alone"), lambda d: d.data, handle)
    puller = Puller(nc, STREAM, "alone")  # not started: fed by hand
    stop = asyncio.Event()
    cpu = time.process_time()
    for start in range(0, n, batch):
        for msg in msgs[start : start + batch]:
            await puller._on_msg(msg)
        arrived = await puller.fetch(batch, 0)
        await consumer._batch_arrived(arrived, puller.gaps.take(), stop)
    cpu = time.process_time() - cpu
    if got != n:
        raise RuntimeError(f"{got} of {n} handled")
    return Figure(n, cpu, cpu)


async def bench(url: str, n: int, batches: list[int], rounds: int, with_raw: bool) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await publish(js, nc, n)
    print(f"load average {os.getloadavg()[0]:.2f}; {n} messages stored")
    print(
        f"{'batch':>5} {'round':>5} {'raw msg/s':>10} {'raw µs':>7} {'rt msg/s':>10} "
        f"{'rt µs':>7} {'cpu ratio':>9}"
    )
    for batch in batches:
        count = min(n, SMALL_BATCH_MESSAGES) if batch == 1 else n
        for r in range(rounds):
            base = (
                await raw(nc, js, f"raw_{batch}_{r}", count, batch)
                if with_raw
                else Figure(1, 1.0, 1.0)
            )
            ours = await runtime(nc, js, f"rt_{batch}_{r}", count, batch)
            print(
                f"{batch:>5} {r:>5} {base.rate:>10.0f} {base.cpu_us:>7.1f} {ours.rate:>10.0f} "
                f"{ours.cpu_us:>7.1f} {ours.cpu_us / base.cpu_us:>9.2f}",
                flush=True,
            )
    for batch in batches:
        figure = await alone(nc, 100_000, batch)
        print(f"runtime alone, batch {batch:>3}: {figure.cpu_us:.2f} µs/msg", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}")
    await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--batches", default="1,16,256,500")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-raw", action="store_true", help="the runtime only (to profile)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-consumer-") as tmp:
        port = embedded_nats.free_port()
        proc = embedded_nats.start(Path(tmp) / "nats", port, Path(tmp) / "nats.log")
        try:
            asyncio.run(
                bench(
                    f"nats://127.0.0.1:{port}", args.messages, batches, args.rounds, not args.no_raw
                )
            )
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
