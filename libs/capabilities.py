"""Which actions each device kind accepts, a minimal check of their params, and how often
each kind is expected to report its attributes.

The one place that knows the vocabulary of the platform's device kinds: the gateway refuses a
rule whose command a registered device could never carry out, and a device program can read
here what it is expected to accept.

A kind that is not listed here accepts any action. Third-party devices bring kinds the
platform cannot know in advance; refusing their commands would lock them out, and such a
device answers an action it lacks with a `failed` command status, which the rule's trace
shows. Listing a kind here is the promise that its devices accept exactly these actions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Param:
    """A required number in `params`: an integer if `integer`, within [low, high] if given."""

    name: str
    integer: bool = False
    low: float | None = None
    high: float | None = None

    @property
    def expected(self) -> str:
        what = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            return f"{what} {self.low:g}-{self.high:g}"
        if self.low is not None:
            return f"{what} of at least {self.low:g}"
        if self.high is not None:
            return f"{what} of at most {self.high:g}"
        return what

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.integer and not isinstance(value, int):
            return False
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)


@dataclass(frozen=True)
class ActionSpec:
    """An action and the params it takes (all required; no others)."""

    name: str
    params: tuple[Param, ...] = ()


_ON_OFF = (ActionSpec("turn_on"), ActionSpec("turn_off"), ActionSpec("toggle"))

KINDS: Mapping[str, tuple[ActionSpec, ...]] = {
    "light": (
        *_ON_OFF,
        ActionSpec("set_brightness", (Param("level", integer=True, low=0, high=100),)),
    ),
    "energy_meter": (ActionSpec("reset_energy"),),
    "sensor": (),
    "switch": _ON_OFF,
    "thermostat": (ActionSpec("set_target", (Param("celsius"),)),),
}


@dataclass(frozen=True)
class ActionProblem:
    """Why a kind cannot take a command; `field` is relative to the command (`action`,
    `params.level`)."""

    field: str
    reason: str


def accepted_actions(kind: str) -> tuple[str, ...] | None:
    """The actions a kind accepts; None for a kind not listed here (it accepts any)."""
    specs = KINDS.get(kind)
    return None if specs is None else tuple(spec.name for spec in specs)


def action_problem(kind: str, action: str, params: Mapping[str, Any]) -> ActionProblem | None:
    """What is wrong with sending `action` with `params` to a device of `kind`, if anything."""
    specs = KINDS.get(kind)
    if specs is None:
        return None
    spec = next((s for s in specs if s.name == action), None)
    if spec is None:
        accepted = ", ".join(s.name for s in specs) or "no actions"
        return ActionProblem(
            "action", f"{_article(kind)} {kind} has no action {action!r}; it accepts {accepted}"
        )
    expected = {p.name: p for p in spec.params}
    for name in params:
        if name not in expected:
            takes = ", ".join(expected) if expected else "no params"
            return ActionProblem(
                f"params.{name}", f"{action} takes no param {name!r} (it takes {takes})"
            )
    for param in spec.params:
        if param.name not in params:
            return ActionProblem(
                f"params.{param.name}", f"{action} needs params.{param.name}: {param.expected}"
            )
        value = params[param.name]
        if not param.accepts(value):
            return ActionProblem(
                f"params.{param.name}",
                f"params.{param.name} must be {param.expected}, got {value!r}",
            )
    return None


def check_action(kind: str, action: str, params: Mapping[str, Any]) -> str | None:
    """Why a device of `kind` cannot take `action` with `params`; None when it can."""
    problem = action_problem(kind, action, params)
    return problem.reason if problem else None


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


# --- how often attributes are reported ----------------------------------------------------

# The longest silence, in seconds, after which an online device's attribute is `stale`. Only
# attributes that devices of a kind send periodically are listed: a light reports `on` when
# it changes, so its silence means nothing, while an energy meter that stops reporting its
# draw is broken even if its heartbeats still come. Five minutes covers the usual meter
# periods (10 s to 1 min) with several reports missed, so that a busy bus or a retried
# connection does not make a healthy meter flap. A device whose period differs says so in
# its registry entry (`report_intervals`, which also turns a default off with null).
REPORT_INTERVALS: Mapping[str, Mapping[str, float]] = {
    "energy_meter": {"power_w": 300.0, "energy_wh": 300.0},
}


def report_intervals(
    kind: str, overrides: Mapping[str, float | None] | None = None
) -> dict[str, float]:
    """How long each attribute of a device may go unreported before it is stale: its kind's
    defaults, then the registry entry's own (`null` there: never stale)."""
    merged: dict[str, float | None] = {**REPORT_INTERVALS.get(kind, {}), **(overrides or {})}
    return {name: seconds for name, seconds in merged.items() if seconds is not None}
