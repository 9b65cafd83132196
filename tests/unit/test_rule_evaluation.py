"""Threshold rules without I/O: when a trigger holds and how episodes start and end."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from libs import messages as m
from services.rules.evaluate import due, holds, step

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def rule(for_s: float = 10.0, **threshold: float) -> m.Rule:
    trigger = m.ThresholdTrigger(device_id="meter", attribute="power_w", for_s=for_s, **threshold)
    action = m.CommandAction(device_id="light", action="turn_off")
    return m.Rule(id="r1", name="r", trigger=trigger, actions=[action], enabled=True, version=1)


@pytest.mark.parametrize(
    ("threshold", "value", "expected"),
    [
        ({"above": 1.0}, 60.0, True),
        ({"above": 1.0}, 1.0, False),
        ({"below": 5.0}, 4, True),
        ({"above": 1.0, "below": 5.0}, 3, True),
        ({"above": 1.0, "below": 5.0}, 7, False),
        ({"above": 1.0}, "60", False),  # a string is not a number
        ({"above": 0.0}, True, False),  # nor is a boolean
        ({"above": 1.0}, None, False),
    ],
)
def test_threshold_holds(threshold: dict, value: object, expected: bool) -> None:
    assert holds(rule(**threshold).trigger, {"power_w": value}) is expected


def test_equals_compares_any_value() -> None:
    trigger = m.ThresholdTrigger(device_id="d", attribute="on", equals=True)
    assert holds(trigger, {"on": True}) and not holds(trigger, {"on": False})


def test_episode_starts_holds_and_ends() -> None:
    r = rule(above=1.0)
    episode, what = step(None, r, {"power_w": 60}, T0, "e1")
    assert what == "start" and episode is not None
    assert episode.deadline == T0 + timedelta(seconds=10)
    assert not due(episode, T0 + timedelta(seconds=9)) and due(episode, T0 + timedelta(seconds=10))
    same, what = step(episode, r, {"power_w": 61}, T0 + timedelta(seconds=1), "e2")
    assert (same, what) == (episode, "hold")
    assert step(episode, r, {"power_w": 0}, T0 + timedelta(seconds=2), "e3") == (None, "end")


def test_episode_id_is_deterministic() -> None:
    a, _ = step(None, rule(above=1.0), {"power_w": 60}, T0, "e1")
    b, _ = step(None, rule(above=1.0), {"power_w": 60}, T0, "e9")
    assert a is not None and b is not None and a.id == b.id


@given(st.lists(st.floats(min_value=-10, max_value=10, allow_nan=False), max_size=60))
def test_never_two_starts_in_one_episode(values: list[float]) -> None:
    """Whatever the readings, starts and ends alternate: one firing per episode at most."""
    r = rule(for_s=0, above=0.0)
    episode, events = None, []
    for i, v in enumerate(values):
        episode, what = step(episode, r, {"power_w": v}, T0 + timedelta(seconds=i), None)
        if what in ("start", "end"):
            events.append(what)
    assert all(a != b for a, b in itertools.pairwise(events))
    assert not events or events[0] == "start"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"above": 5, "below": 3}, "`below` must be greater than `above`"),
        ({}, "needs `above`, `below` or `equals`"),
        ({"above": 1, "for_s": -1}, "Expected `float` >= 0"),
        ({"above": 1, "colour": "red"}, "unknown field `colour`"),
    ],
)
def test_invalid_rules_are_refused_with_the_field(spec: dict, message: str) -> None:
    body = {
        "name": "x",
        "trigger": {"type": "threshold", "device_id": "d", "attribute": "p", **spec},
        "actions": [{"type": "set_state", "device_id": "d"}],
    }
    with pytest.raises(msgspec.ValidationError, match=message) as info:
        m.rule_spec_decoder.decode(msgspec.json.encode(body))
    assert "$.trigger" in str(info.value)
