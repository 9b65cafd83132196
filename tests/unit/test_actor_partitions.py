"""The actors' share of partitions and the processes `smarthome up` runs for them."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

from libs.settings import Settings
from services.actors.partitions import partition_of
from services.launcher.cli import _monitoring, copies


def test_up_runs_as_many_actors_processes_as_set_each_with_its_own_name() -> None:
    s = dataclasses.replace(Settings(data_dir=Path("/tmp/unused")), actor_processes=3)
    assert copies("actors", s) == ["actors", "actors-2", "actors-3"]
    assert copies("rules", s) == ["rules"]
    instances = {_monitoring(c, "http://x")[0]["SMARTHOME_INSTANCE"] for c in copies("actors", s)}
    host = socket.gethostname()
    assert instances == {host, f"{host}-2", f"{host}-3"}


def test_one_device_always_lands_in_one_partition_and_the_partitions_are_all_used() -> None:
    devices = [f"sensor-{n}" for n in range(400)]
    assert [partition_of(d, 16) for d in devices] == [partition_of(d, 16) for d in devices]
    assert {partition_of(d, 16) for d in devices} == set(range(16))
    assert partition_of("", 4) == 0x811C9DC5 % 4  # FNV-1a's offset basis: the empty key
