"""Rule logic without I/O: triggers, hysteresis, episodes, conditions, schedules, dry-run."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from libs import messages as m
from libs import rule_logic as rl

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)  # a Monday


def rule(trigger: m.Trigger, conditions: list | None = None) -> m.Rule:
    action = m.CommandAction(device_id="light", action="turn_off")
    return m.Rule(
        id="r1",
        name="r",
        trigger=trigger,
        actions=[action],
        enabled=True,
        version=1,
        conditions=conditions or [],
    )


def threshold(for_: str | float = "10s", **kw: object) -> m.ThresholdTrigger:
    return m.ThresholdTrigger(device_id="meter", attribute="power_w", for_=for_, **kw)  # type: ignore[arg-type]


def obs(power: object, device: str = "meter", **kw: str) -> rl.Observation:
    return rl.Observation(device, {"power_w": power}, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kw", "value", "expected"),
    [
        ({"above": 1.0}, 60.0, True),
        ({"above": 1.0}, 1.0, False),
        ({"below": 5.0}, 4, True),
        ({"between": (1.0, 5.0)}, 3, True),
        ({"between": (1.0, 5.0)}, 7, False),
        ({"above": 1.0}, "60", False),  # a string is not a number
        ({"above": 0.0}, True, False),  # nor is a boolean
        ({"above": 1.0}, None, False),
    ],
)
def test_threshold_holds(kw: dict, value: object, expected: bool) -> None:
    assert rl.threshold_holds(threshold(**kw), {"power_w": value}) is expected


def test_hysteresis_keeps_an_episode_until_the_value_clears_the_band() -> None:
    r = rule(threshold(for_=0, above=20.0, hysteresis=2.0))
    ep, what = rl.step(None, r, obs(21), T0)
    assert what == "start"
    assert rl.step(ep, r, obs(19), T0)[1] == "hold"  # 19 > 20 - 2: still in the episode
    assert rl.step(ep, r, obs(18), T0)[1] == "end"
    assert rl.step(None, r, obs(19), T0)[1] == "none"  # but 19 does not start one


def test_episode_starts_holds_ends_with_durable_deadline() -> None:
    r = rule(threshold(for_="10m", above=1.0))
    ep, what = rl.step(None, r, obs(60), T0)
    assert what == "start" and ep is not None
    assert ep.deadline == T0 + timedelta(minutes=10)
    assert not rl.due(ep, T0 + timedelta(minutes=9)) and rl.due(ep, T0 + timedelta(minutes=10))
    assert rl.step(ep, r, obs(61), T0) == (ep, "hold")
    assert rl.step(ep, r, obs(0), T0) == (None, "end")
    again, _ = rl.step(None, r, obs(60), T0)
    assert again is not None and again.id == ep.id  # deterministic: same start, same id


def test_state_trigger_needs_the_from_value_to_start() -> None:
    r = rule(m.StateTrigger(device_id="door", attribute="connection", to="offline", from_="online"))
    went_offline = rl.Observation("door", {}, connection="offline", previous_connection="online")
    stayed_offline = rl.Observation("door", {}, connection="offline", previous_connection="offline")
    assert rl.step(None, r, went_offline, T0)[1] == "start"
    assert rl.step(None, r, stayed_offline, T0)[1] == "none"


def test_selector_matches_kind_location_and_tag() -> None:
    t = m.ThresholdTrigger(
        attribute="t", above=30, selector=m.Selector(kind="sensor", location="home/up")
    )
    assert rl.selects(t, "s1", rl.DeviceInfo("sensor", "home/up/bedroom"))
    assert not rl.selects(t, "s1", rl.DeviceInfo("sensor", "home/ground"))
    assert not rl.selects(t, "s1", rl.DeviceInfo("light", "home/up"))
    assert not rl.selects(t, "s1", rl.DeviceInfo("sensor", "home/upstairs"))  # not under home/up
    tagged = m.ThresholdTrigger(attribute="t", above=30, selector=m.Selector(tag="freezer"))
    assert rl.selects(tagged, "s2", rl.DeviceInfo("sensor", None, ("freezer",)))


def test_event_trigger_matches_subject_pattern_and_data() -> None:
    t = m.EventTrigger(subject="events.*.button", match={"press": "long"})
    assert rl.event_matches(t, "events.hall.button", {"press": "long", "n": 1})
    assert not rl.event_matches(t, "events.hall.button", {"press": "short"})
    assert not rl.event_matches(t, "events.hall.motion", {"press": "long"})


def test_schedule_uses_the_home_time_zone() -> None:
    t = m.ScheduleTrigger(cron="0 7 * * 1-5", timezone="Europe/Paris")
    first = rl.next_occurrence(t, T0)  # Monday 12:00 UTC -> Tuesday 07:00 Paris = 06:00 UTC
    assert first == datetime(2026, 1, 6, 6, 0, tzinfo=UTC)
    friday = rl.next_occurrence(t, datetime(2026, 1, 9, 7, 0, tzinfo=UTC))
    assert friday == datetime(2026, 1, 12, 6, 0, tzinfo=UTC)  # skips the weekend


def test_conditions_all_any_not_and_time_windows() -> None:
    views = {"light": rl.DeviceView("active", "online", {"brightness": 80})}
    night = m.TimeCondition(after="22:00", before="06:00")
    bright = m.AttributeCondition(device_id="light", attribute="brightness", above=50)
    online = m.StateCondition(device_id="light", connection="online")
    assert rl.check(m.AllOf(conditions=[bright, online]), views, T0)[0]
    assert not rl.check(night, views, T0)[0]  # 12:00 is not night
    assert rl.check(night, views, T0.replace(hour=23))[0]  # wraps midnight
    assert rl.check(m.Not(condition=night), views, T0)[0]
    ok, why = rl.check(
        m.AnyOf(conditions=[night, m.StateCondition(device_id="x", state="off")]), views, T0
    )
    assert not ok and "x is unknown" in why


@given(
    st.lists(st.floats(min_value=-10, max_value=10, allow_nan=False), max_size=60),
    st.floats(min_value=0, max_value=3),
)
def test_never_two_starts_in_one_episode(values: list[float], hysteresis: float) -> None:
    """Whatever the readings and hysteresis, starts and ends alternate: one firing per episode."""
    r = rule(threshold(for_=0, above=0.0, hysteresis=hysteresis))
    episode, events = None, []
    for i, v in enumerate(values):
        episode, what = rl.step(episode, r, obs(v), T0 + timedelta(seconds=i))
        if what in ("start", "end"):
            events.append(what)
    assert all(a != b for a, b in itertools.pairwise(events))
    assert not events or events[0] == "start"


def test_dry_run_reports_when_it_would_have_fired() -> None:
    r = rule(threshold(for_="30s", above=1.0))
    history = [
        rl.Recorded(T0, "meter", "telemetry", {"power_w": 60}),
        rl.Recorded(T0 + timedelta(seconds=10), "meter", "telemetry", {"power_w": 0}),  # too short
        rl.Recorded(T0 + timedelta(seconds=60), "meter", "telemetry", {"power_w": 55}),
        rl.Recorded(T0 + timedelta(seconds=70), "meter", "telemetry", {"power_w": 58}),
        rl.Recorded(T0 + timedelta(seconds=120), "meter", "telemetry", {"power_w": 0}),
        rl.Recorded(T0 + timedelta(seconds=125), "other", "telemetry", {"power_w": 99}),
    ]
    firings = rl.simulate(r, history, T0, T0 + timedelta(hours=1))
    assert [f.at for f in firings] == [T0 + timedelta(seconds=90)]
    assert "power_w = 55" in firings[0].reason


@pytest.mark.parametrize(
    ("trigger", "message"),
    [
        (
            {"type": "threshold", "device_id": "d", "attribute": "p", "above": 5, "below": 3},
            "`below` must be greater than `above`",
        ),
        ({"type": "threshold", "device_id": "d", "attribute": "p"}, "needs `above`, `below`"),
        (
            {"type": "threshold", "device_id": "d", "attribute": "p", "above": 1, "for": "10x"},
            "'10x' is not a duration",
        ),
        ({"type": "threshold", "attribute": "p", "above": 1}, "exactly one of `device_id`"),
        (
            {"type": "threshold", "device_id": "d", "attribute": "p", "above": 1, "colour": 1},
            "unknown field `colour`",
        ),
        ({"type": "schedule", "cron": "0 0 7 * * *"}, "`cron` needs 5 fields"),
        ({"type": "schedule", "cron": "0 7 * * *", "timezone": "Mars/Base"}, "IANA time zone"),
        ({"type": "state", "device_id": "d", "to": "purple"}, "`to` must be one of"),
        ({"type": "event", "subject": "commands.x"}, "must be a pattern under `events.`"),
    ],
)
def test_invalid_rules_are_refused_naming_the_field(trigger: dict, message: str) -> None:
    body = {"name": "x", "trigger": trigger, "actions": [{"type": "set_state", "device_id": "d"}]}
    with pytest.raises(msgspec.ValidationError, match=message) as info:
        m.rule_spec_decoder.decode(msgspec.json.encode(body))
    assert "$.trigger" in str(info.value)


@pytest.mark.parametrize(
    ("value", "seconds"), [("30s", 30), ("10m", 600), ("1.5h", 5400), ("2d", 172800), (45, 45)]
)
def test_durations(value: str | int, seconds: float) -> None:
    assert m.parse_duration(value) == seconds
