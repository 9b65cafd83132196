"""The event loop's lag, the collector's pauses and the CPU wait, as the metrics report them."""

from __future__ import annotations

import asyncio
import gc
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from libs import loop_health


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_blocked_loop_shows_as_lag() -> None:
    over_50ms = "smarthome_event_loop_lag_seconds_bucket"
    slow_before = sample("smarthome_event_loop_lag_seconds_count") - sample(over_50ms, le="0.05")
    watcher = asyncio.create_task(loop_health.watch_loop(tick=0.01))
    await asyncio.sleep(0.02)  # the watcher is asleep in its tick
    time.sleep(0.08)  # a callback that holds the loop
    await asyncio.sleep(0.03)
    watcher.cancel()

    slow = sample("smarthome_event_loop_lag_seconds_count") - sample(over_50ms, le="0.05")
    assert slow - slow_before >= 1  # the wake the callback held came over 50 ms late


def test_each_collection_is_timed_by_its_generation() -> None:
    loop_health.install()
    loop_health.install()  # once per process, however often asked
    before = sample("smarthome_gc_pause_seconds_count", generation="2")
    young_before = sample("smarthome_gc_pause_seconds_count", generation="0")

    gc.collect()
    gc.collect(0)

    assert sample("smarthome_gc_pause_seconds_count", generation="2") == before + 1
    assert sample("smarthome_gc_pause_seconds_count", generation="0") >= young_before + 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="schedstat is Linux's")
def test_the_cpu_wait_is_the_kernels_count() -> None:
    loop_health.install()
    fields = Path("/proc/self/schedstat").read_text().split()

    reported = sample("smarthome_process_cpu_wait_seconds_total")

    assert reported >= int(fields[1]) / 1e9  # a count that only grows, read after


def test_no_schedstat_means_no_cpu_wait(tmp_path: Path) -> None:
    assert loop_health.cpu_wait_seconds(tmp_path / "absent") is None
    (tmp_path / "schedstat").write_text("1200 3400000000 7\n")
    assert loop_health.cpu_wait_seconds(tmp_path / "schedstat") == 3.4
