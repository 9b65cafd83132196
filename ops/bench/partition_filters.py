"""nats-server's CPU per event delivered to the actors' partition consumers, by where the
stored subject holds the partition token; against one unfiltered consumer reading the same
events in the same run (the baseline). Not a test.

    .venv/bin/python ops/bench/partition_filters.py [--events 64000] [--devices 1000,10000]
        [--partitions 16] [--batch 256]

For each fleet size, a nats-server of its own per layout (the wheel's, a scratch directory):
EVENTS takes `events.<device>.telemetry` through a subject transform, as the platform's does,
the events are published first, then drained by P durable pull consumers (AckPolicy.ALL,
one ack per batch, as the actors' partitions), and the server's CPU over the drain is
divided by the events delivered. The layouts:

- **last** (installs made before stop 21, `libs.subjects.partitioned(P, first=False)`):
  stored `events.<device>.<type>.<p>`, a partition's filter `events.*.*.<p>`;
- **first** (new installs since): stored `events.~.<p>.<device>.<type>` (`~` is no device
  id: no filter on the other layout can match it), a partition's filter `events.~.<p>.>`;
- **baseline**: one consumer, no filter, delivering every event.

What it showed (stop 21), and why new installs store the partition first: to find a filtered
consumer's next message in a block, nats-server 2.15 walks the block's per-subject index for
a filter that begins with wildcards (`msgBlock.firstMatching` → `SubjectTree.Match`: 62 % of
its CPU in e2e (g)'s drain of 1,000 devices, from a pprof profile), unless the block holds 4x
more subjects than messages left in it, when it scans the messages instead. A fleet of a few
thousand devices whose backlog packs a block with many events per device pays the walk for
every event delivered (partition last: 8.9x the baseline at 1,000 devices, 11.3x at 3,000);
partition first makes it a walk of the partition's own branch (2.0x, 2.7x); at 10,000
devices both scan (1.5x, 1.4x).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nats
import psutil
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig, SubjectTransform
from nats.js.client import JetStreamContext

from libs import bus, embedded_nats, subjects

PAYLOAD = b'{"specversion":"1.0","type":"telemetry","data":{"power":12.5}}' + b" " * 240
PUBLISH_CHUNK = 1000


@dataclass(frozen=True)
class Layout:
    name: str
    destination: str  # the stream's subject transform
    filters: list[str]  # one consumer per filter


def layouts(partitions: int) -> list[Layout]:
    last = subjects.partitioned(partitions, first=False)[1]
    first = subjects.partitioned(partitions, first=True)[1]
    every = range(partitions)
    return [
        Layout("baseline", first, [">"]),
        Layout("last", last, [subjects.events_partition(p, first=False) for p in every]),
        Layout("first", first, [subjects.events_partition(p, first=True) for p in every]),
    ]


async def drain_cost(layout: Layout, events: int, devices: int, batch: int) -> tuple[float, float]:
    """(server CPU µs per event delivered, events delivered per second)."""
    scratch = Path(tempfile.mkdtemp(prefix="bench-partitions-"))
    port = embedded_nats.free_port()
    server = embedded_nats.start(scratch, port)
    nc = await nats.connect(f"nats://127.0.0.1:{port}")
    try:
        js = nc.jetstream()
        transform = SubjectTransform(src=subjects.EVENTS_PUBLISHED, dest=layout.destination)
        await js.add_stream(
            StreamConfig(
                name=subjects.EVENTS_STREAM,
                subjects=[subjects.EVENTS_PUBLISHED],
                subject_transform=transform,
                storage=StorageType.FILE,
            )
        )
        for start in range(0, events, PUBLISH_CHUNK):
            chunk = range(start, min(events, start + PUBLISH_CHUNK))
            await bus.publish_many(
                js, [(f"events.dev-{n % devices:06d}.telemetry", PAYLOAD, None) for n in chunk]
            )
        subs = [
            await js.pull_subscribe(
                f,
                durable=f"c{n}",
                stream=subjects.EVENTS_STREAM,
                config=ConsumerConfig(ack_policy=AckPolicy.ALL),
            )
            for n, f in enumerate(layout.filters)
        ]
        pending = [(await s.consumer_info()).num_pending or 0 for s in subs]
        proc = psutil.Process(server.pid)
        before, began = sum(proc.cpu_times()[:2]), time.perf_counter()
        drains = (_drain(s, n, batch) for s, n in zip(subs, pending, strict=True))
        delivered = sum(await asyncio.gather(*drains))
        wall = time.perf_counter() - began
        used = sum(proc.cpu_times()[:2]) - before
        if delivered != events:
            raise SystemExit(f"{layout.name}: {delivered} of {events} delivered")
        return used / delivered * 1e6, delivered / wall
    finally:
        await nc.close()
        server.terminate()
        server.wait(10)
        shutil.rmtree(scratch, ignore_errors=True)


async def _drain(sub: JetStreamContext.PullSubscription, pending: int, batch: int) -> int:
    """Fetch and ack (the last of each batch) the `pending` events the consumer has."""
    got = 0
    while got < pending:
        with contextlib.suppress(nats.errors.TimeoutError, asyncio.TimeoutError):
            msgs = await sub.fetch(min(batch, pending - got), timeout=5)
            got += len(msgs)
            await msgs[-1].ack()
    return got


async def main(args: argparse.Namespace) -> None:
    print(
        f"{args.events:,} events, {args.partitions} partitions, batches of {args.batch}; "
        "nats-server CPU per event delivered (µs) and events delivered per second"
    )
    print(f"{'devices':>8} {'layout':>9} {'µs/event':>9} {'÷ baseline':>11} {'events/s':>10}")
    for devices in args.devices:
        base = None
        for layout in layouts(args.partitions):
            cost, rate = await drain_cost(layout, args.events, devices, args.batch)
            base = base or cost
            print(
                f"{devices:>8,} {layout.name:>9} {cost:>9.1f} {cost / base:>10.2f}x {rate:>10,.0f}"
            )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=64_000)
    p.add_argument(
        "--devices", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 10_000]
    )
    p.add_argument("--partitions", type=int, default=bus.DEFAULT_PARTITIONS)
    p.add_argument("--batch", type=int, default=bus.ACTORS_BATCH)
    return p.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
