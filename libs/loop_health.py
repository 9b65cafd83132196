"""What keeps a process's event loop from running on time, as metrics.

A message waits for its process's loop: while a callback runs long, while the collector
pauses the process, and while the process is ready to run but the machine gives its CPU to
others. The last is invisible from inside the code (no slow function shows in a profile) and
was the tail of the soak's event → state fact latency on two busy cores, so each is measured:

- `smarthome_event_loop_lag_seconds`: how late a timer fires (a wake every `TICK_S`);
- `smarthome_gc_pause_seconds{generation}`: each collection of the cyclic collector;
- `smarthome_process_cpu_wait_seconds_total`: the time the loop's thread was ready to run and
  waited for a CPU (Linux's schedstat; absent where there is none). Its rate against
  `process_cpu_seconds_total` says whether a slow process is busy or starved.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

TICK_S = 0.25
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

LOOP_LAG = Histogram(
    "smarthome_event_loop_lag_seconds",
    "How late the event loop ran a timer: what any message waited for the loop then",
    buckets=_BUCKETS,
)
GC_PAUSE = Histogram(
    "smarthome_gc_pause_seconds",
    "Collections of the cyclic garbage collector, by generation (the process is paused)",
    ["generation"],
    buckets=_BUCKETS,
)
# The main thread's: the event loop runs on it.
SCHEDSTAT = Path("/proc/self/schedstat")


def cpu_wait_seconds(schedstat: Path = SCHEDSTAT) -> float | None:
    """The thread's time ready to run but not running (its second field, in nanoseconds);
    None where the kernel keeps no such count."""
    try:
        return int(schedstat.read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


class _CpuWait(Collector):
    def collect(self) -> Iterator[CounterMetricFamily]:
        waited = cpu_wait_seconds()
        if waited is not None:
            yield CounterMetricFamily(
                "smarthome_process_cpu_wait_seconds",
                "Time the event loop's thread was ready to run and waited for a CPU",
                value=waited,
            )


class _GcTimer:
    """Times each collection (`gc.callbacks` runs it at its start and its stop)."""

    def __init__(self) -> None:
        self._began = 0.0
        self._pauses = [GC_PAUSE.labels(str(g)) for g in range(3)]

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self._pauses[info["generation"]].observe(time.perf_counter() - self._began)


def install() -> None:
    """Time the collector's pauses and report the CPU wait (once per process)."""
    if any(isinstance(callback, _GcTimer) for callback in gc.callbacks):
        return
    gc.callbacks.append(_GcTimer())
    REGISTRY.register(_CpuWait())


async def watch_loop(tick: float = TICK_S) -> None:
    """Observe how late each wake every `tick` comes, until cancelled."""
    clock = time.perf_counter
    while True:
        began = clock()
        await asyncio.sleep(tick)
        LOOP_LAG.observe(max(0.0, clock() - began - tick))
