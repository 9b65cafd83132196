"""The virtual devices: what each kind reports and how it answers commands. Pure (no I/O),
seeded, so that a run can be repeated."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from libs import messages as m

KINDS = ("sensor", "light", "energy_meter")
LIGHT_POWER_W = 60.0


@dataclass
class VirtualDevice:
    id: str
    kind: str
    rng: random.Random
    attributes: dict[str, m.AttributeValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind == "sensor":
            self.attributes = {"temperature_c": 21.0, "humidity_pct": 45.0}
        elif self.kind == "light":
            self.attributes = {"on": True, "brightness": 100, "power_w": LIGHT_POWER_W}
        else:
            self.attributes = {"power_w": 0.0, "energy_wh": 0.0}

    def reading(self, elapsed_s: float) -> dict[str, m.AttributeValue]:
        """The next telemetry, `elapsed_s` after the previous one."""
        a = self.attributes
        if self.kind == "sensor":
            a["temperature_c"] = _walk(self.rng, a["temperature_c"], 0.2, 5.0, 35.0)
            a["humidity_pct"] = _walk(self.rng, a["humidity_pct"], 0.5, 10.0, 90.0)
        elif self.kind == "energy_meter":
            a["power_w"] = _walk(self.rng, a["power_w"], 50.0, 0.0, 3000.0)
            energy_wh = _number(a["energy_wh"]) + _number(a["power_w"]) * elapsed_s / 3600
            a["energy_wh"] = round(energy_wh, 4)
        return dict(a)

    def command(self, action: str, params: dict[str, Any]) -> str | None:
        """Carry out a command; why it failed, or None."""
        if self.kind == "light" and action in ("turn_on", "turn_off", "toggle"):
            on = {"turn_on": True, "turn_off": False}.get(action, not self.attributes["on"])
            self._light(on, int(_number(self.attributes["brightness"])))
            return None
        if self.kind == "light" and action == "set_brightness":
            level = params.get("level")
            if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 100:
                return "params.level must be an integer 0-100"
            self._light(bool(self.attributes["on"]), level)
            return None
        if self.kind == "energy_meter" and action == "reset_energy":
            self.attributes["energy_wh"] = 0.0
            return None
        return f"a {self.kind} has no action {action!r}"

    def _light(self, on: bool, brightness: int) -> None:
        power = round(LIGHT_POWER_W * brightness / 100, 2) if on else 0.0
        self.attributes.update(on=on, brightness=brightness, power_w=power)


def fleet(prefix: str, count: int, kinds: tuple[str, ...], seed: int) -> list[VirtualDevice]:
    """`count` devices `<prefix>-<n>`, their kinds taken in turn."""
    rng = random.Random(seed)
    return [
        VirtualDevice(f"{prefix}-{n}", kinds[n % len(kinds)], random.Random(rng.random()))
        for n in range(count)
    ]


def _walk(
    rng: random.Random, value: m.AttributeValue, step: float, low: float, high: float
) -> float:
    current = _number(value)
    return round(min(high, max(low, current + rng.uniform(-step, step))), 2)


def _number(value: m.AttributeValue) -> float:
    """A numeric attribute the device itself set (never None or text)."""
    if isinstance(value, int | float):
        return float(value)
    raise TypeError(f"not a number: {value!r}")
