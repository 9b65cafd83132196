"""`smarthome up` stops its children in the reverse of their start, a tier at a time."""

from __future__ import annotations

from pathlib import Path

from services.launcher.cli import stopping_order
from services.launcher.supervisor import Child


def test_devices_then_workers_together_then_the_gateway_then_busauth() -> None:
    started = [
        "busauth",
        "gateway",
        "actors",
        "actors-2",
        "rules",
        "recorder",
        "webhooks",
        "lightbulb",
        "energy_tracker",
    ]
    children = [Child(name, ["true"], {}, Path(f"/tmp/{name}.log")) for name in started]
    tiers = [sorted(c.name for c in tier) for tier in stopping_order(children)]
    assert tiers == [
        ["energy_tracker", "lightbulb"],
        ["actors", "actors-2", "recorder", "rules", "webhooks"],
        ["gateway"],
        ["busauth"],
    ]


def test_without_the_demo_the_workers_stop_first() -> None:
    children = [Child(n, ["true"], {}, Path(f"/tmp/{n}.log")) for n in ("gateway", "actors")]
    assert [[c.name for c in t] for t in stopping_order(children)] == [["actors"], ["gateway"]]
