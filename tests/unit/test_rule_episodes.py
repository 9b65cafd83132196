"""The episode book without I/O (`libs.episodes`): start, hold, fire once, clear; `for`
deadlines; single / restart / queued modes; replays."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libs import episodes as ep
from libs import messages as m
from libs import rule_logic as rl

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
WORLD = ep.World(
    {}, {"meter": rl.DeviceInfo("energy_meter", None), "light": rl.DeviceInfo("light", None)}
)


def threshold_rule(for_s: float = 10.0, actions: list[m.Action] | None = None) -> m.Rule:
    return m.Rule(
        id="r1",
        name="r",
        trigger=m.ThresholdTrigger(device_id="meter", attribute="power_w", above=1.0, for_=for_s),
        actions=actions or [m.CommandAction(device_id="light", action="turn_off")],
        enabled=True,
        version=1,
    )


def event_rule(mode: m.RuleMode) -> m.Rule:
    return m.Rule(
        id="e1",
        name="e",
        trigger=m.EventTrigger(subject="events.button.pressed"),
        actions=[
            m.CommandAction(device_id="light", action="turn_on"),
            m.DelayAction(for_="10s"),
            m.CommandAction(device_id="light", action="turn_off"),
        ],
        enabled=True,
        version=1,
        mode=mode,
    )


def fact(power: float, at: datetime) -> m.DeviceStateFact:
    return m.DeviceStateFact(
        device_id="meter",
        version=1,
        state="active" if power else "off",
        connection="online",
        attributes={"power_w": power},
        last_seen=at,
        changed=["attributes"],
        previous_state=None,
        cause_event_id=f"cause-{at.timestamp()}",
        cause_type="telemetry",
        correlation_id=None,
        time=at,
    )


def press(n: int) -> m.CloudEvent:
    return m.make_event("button", "pressed", {"n": n}, event_id=f"press-{n}")


def runs(effects: list[ep.Effect]) -> list[ep.Run]:
    return [e for e in effects if isinstance(e, ep.Run)]


def test_an_episode_starts_holds_and_fires_once_at_its_deadline() -> None:
    rule = threshold_rule(for_s=10)
    book, effects, outcomes = ep.on_fact(ep.Book(), 1, fact(60, T0), [rule], WORLD, T0)
    assert outcomes == ["start"]
    assert [type(e) for e in effects] == [ep.Put]
    book, effects, outcomes = ep.on_fact(
        book, 2, fact(70, T0 + timedelta(seconds=5)), [rule], WORLD, T0 + timedelta(seconds=5)
    )
    assert (effects, outcomes) == ([], ["hold"])
    assert ep.on_tick(book, {"r1": rule}, WORLD, T0 + timedelta(seconds=9)).effects == []

    fired = ep.on_tick(book, {"r1": rule}, WORLD, T0 + timedelta(seconds=10))

    [run] = runs(fired.effects)
    assert (run.kind, run.actions) == ("fired", range(0, 1))
    assert "power_w = 60" in run.reason
    assert ep.on_tick(fired.book, {"r1": rule}, WORLD, T0 + timedelta(seconds=60)).effects == []


def test_clearing_before_the_deadline_fires_nothing_and_forgets_the_episode() -> None:
    rule = threshold_rule(for_s=10)
    book, _, _ = ep.on_fact(ep.Book(), 1, fact(60, T0), [rule], WORLD, T0)
    at = T0 + timedelta(seconds=5)
    book, effects, outcomes = ep.on_fact(book, 2, fact(0, at), [rule], WORLD, at)
    assert outcomes == ["end"]
    assert effects == [ep.Delete("r1.meter")]
    assert ep.on_tick(book, {"r1": rule}, WORLD, T0 + timedelta(minutes=1)).effects == []


def test_an_episode_that_fired_clears_its_marks_when_it_ends() -> None:
    rule = threshold_rule(for_s=0)
    book, effects, _ = ep.on_fact(ep.Book(), 1, fact(60, T0), [rule], WORLD, T0)
    assert [type(e) for e in effects] == [ep.Run, ep.Put]  # stored after the actions
    book, effects, _ = ep.on_fact(book, 2, fact(0, T0), [rule], WORLD, T0)
    assert [type(e) for e in effects] == [ep.Clear, ep.Delete]
    assert book.episodes == {}


def test_failing_conditions_skip_the_actions_and_say_why() -> None:
    rule = msgspec.structs.replace(
        threshold_rule(for_s=0),
        conditions=[m.StateCondition(device_id="light", state="active")],
    )
    _, effects, _ = ep.on_fact(ep.Book(), 1, fact(60, T0), [rule], WORLD, T0)
    [skip] = [e for e in effects if isinstance(e, ep.Skip)]
    assert skip.note == "conditions: light is unknown"
    assert runs(effects) == []


def test_a_delay_stops_the_run_and_the_clock_resumes_it() -> None:
    rule = event_rule(m.RuleMode.SINGLE)
    book, effects, _ = ep.on_event(
        ep.Book(), 1, "events.button.pressed", press(1), T0, [rule], WORLD, T0
    )
    [first] = runs(effects)
    assert (first.actions, first.resume_at) == (range(0, 2), T0 + timedelta(seconds=10))
    later = T0 + timedelta(seconds=10)
    book, effects, _ = ep.on_tick(book, {"e1": rule}, WORLD, later)
    [rest] = runs(effects)
    assert (rest.kind, rest.actions, rest.reason) == ("continued", range(2, 3), "after delay")
    assert book.episodes == {}


def test_mode_single_skips_a_trigger_during_a_run() -> None:
    rule = event_rule(m.RuleMode.SINGLE)
    book, _, _ = ep.on_event(ep.Book(), 1, "events.button.pressed", press(1), T0, [rule], WORLD, T0)
    _, effects, _ = ep.on_event(book, 2, "events.button.pressed", press(2), T0, [rule], WORLD, T0)
    [skip] = effects
    assert isinstance(skip, ep.Skip) and skip.note == "already running (mode single)"


def test_mode_restart_replaces_the_run() -> None:
    rule = event_rule(m.RuleMode.RESTART)
    book, _, _ = ep.on_event(ep.Book(), 1, "events.button.pressed", press(1), T0, [rule], WORLD, T0)
    book, effects, _ = ep.on_event(
        book, 2, "events.button.pressed", press(2), T0, [rule], WORLD, T0
    )
    [run] = runs(effects)
    assert run.episode.trigger_event_id == "press-2"
    assert book.episodes["e1.event"].trigger_event_id == "press-2"


@pytest.mark.parametrize("mode", list(m.RuleMode))
def test_a_trigger_redelivered_after_a_crash_is_not_a_new_one(mode: m.RuleMode) -> None:
    """The run's episode was stored, the event not acked: after a restart the book holds
    the episode but not the event's sequence, and the same event comes again."""
    rule = event_rule(mode)
    book, _, _ = ep.on_event(ep.Book(), 7, "events.button.pressed", press(1), T0, [rule], WORLD, T0)
    restarted = ep.Book(book.episodes)
    after, effects, _ = ep.on_event(
        restarted, 7, "events.button.pressed", press(1), T0, [rule], WORLD, T0
    )
    assert effects == []
    assert after.episodes == book.episodes


def test_mode_queued_runs_the_next_trigger_after_the_run() -> None:
    rule = event_rule(m.RuleMode.QUEUED)
    book, _, _ = ep.on_event(ep.Book(), 1, "events.button.pressed", press(1), T0, [rule], WORLD, T0)
    book, effects, _ = ep.on_event(
        book, 2, "events.button.pressed", press(2), T0, [rule], WORLD, T0
    )
    assert runs(effects) == []
    book, effects, _ = ep.on_tick(book, {"e1": rule}, WORLD, T0 + timedelta(seconds=10))
    assert [(r.kind, r.episode.trigger_event_id) for r in runs(effects)] == [
        ("continued", "press-1"),
        ("fired", "press-2"),
    ]


def test_a_schedule_rule_always_has_its_next_time_waiting() -> None:
    rule = m.Rule(
        id="s1",
        name="s",
        trigger=m.ScheduleTrigger(cron="0 * * * *"),
        actions=[m.CommandAction(device_id="light", action="turn_off")],
        enabled=True,
        version=1,
    )
    book, effects, _ = ep.schedule(ep.Book(), [rule], T0)
    assert book.episodes["s1.schedule"].deadline == T0 + timedelta(hours=1)
    assert ep.schedule(book, [rule], T0).effects == []  # one, not two
    book, effects, _ = ep.on_tick(book, {"s1": rule}, WORLD, T0 + timedelta(hours=1))
    assert len(runs(effects)) == 1
    assert book.episodes["s1.schedule"].deadline == T0 + timedelta(hours=2)


def test_a_rule_gone_forgets_its_episodes() -> None:
    book, _, _ = ep.on_fact(ep.Book(), 1, fact(60, T0), [threshold_rule()], WORLD, T0)
    book, effects, _ = ep.on_tick(book, {}, WORLD, T0)
    assert (book.episodes, effects) == ({}, [ep.Delete("r1.meter")])


def test_a_rule_switched_off_and_on_again_fires_again_on_its_next_trigger() -> None:
    # Fired and still held when switched off: the readings that would end it (the meter at
    # 0 W) come while the rule is off, and a value that no longer changes makes no new fact.
    rule = threshold_rule(for_s=0)
    book, _, _ = ep.on_fact(ep.Book(), 1, fact(60, T0), [rule], WORLD, T0)
    off = msgspec.structs.replace(rule, enabled=False, version=2)

    book, effects, _ = ep.retire(book, {"r1": off})

    [clear] = [e for e in effects if isinstance(e, ep.Clear)]
    assert clear.note == "the rule was disabled"
    assert ep.Delete("r1.meter") in effects and book.episodes == {}
    on = msgspec.structs.replace(rule, version=3)
    assert ep.retire(book, {"r1": on}).effects == []
    at = T0 + timedelta(seconds=30)
    fired = ep.on_fact(book, 2, fact(60, at), [on], WORLD, at)
    assert [r.kind for r in runs(fired.effects)] == ["fired"]


def test_a_rule_changed_since_its_episode_began_starts_afresh() -> None:
    rule = threshold_rule(for_s=10)
    book, _, _ = ep.on_fact(ep.Book(), 1, fact(60, T0), [rule], WORLD, T0)
    assert ep.retire(book, {"r1": rule}).effects == []  # unchanged: kept
    edited = msgspec.structs.replace(rule, version=2)

    book, effects, _ = ep.retire(book, {"r1": edited})

    assert effects == [ep.Delete("r1.meter")]  # not fired yet: nothing to clear
    assert book.episodes == {}


def test_an_episode_stored_before_versions_were_kept_is_not_retired() -> None:
    rule = threshold_rule(for_s=10)
    book, _, _ = ep.on_fact(ep.Book(), 1, fact(60, T0), [rule], WORLD, T0)
    old = {k: msgspec.structs.replace(e, rule_version=0) for k, e in book.episodes.items()}
    edited = msgspec.structs.replace(rule, version=5)
    assert ep.retire(ep.Book(old), {"r1": edited}).effects == []


def test_a_homed_rule_ignores_a_device_of_another_home() -> None:
    rule = msgspec.structs.replace(threshold_rule(for_s=0), home="home-a")
    world = ep.World({}, {"meter": rl.DeviceInfo("energy_meter", "home-b/kitchen")})
    assert ep.on_fact(ep.Book(), 1, fact(60, T0), [rule], world, T0).outcomes == []


# --- properties ---------------------------------------------------------------------------------

# A history of a meter: readings (power, seconds after the last input) and clock ticks. Fact
# times differ (an episode is named by its start: two starting in one microsecond are one).
steps = st.lists(
    st.tuples(
        st.sampled_from(["reading", "tick"]), st.sampled_from([0.0, 5.0, 60.0]), st.integers(1, 20)
    ),
    max_size=40,
)


def play(
    rule: m.Rule, history: list[tuple[str, float, int]]
) -> tuple[ep.Book, list[ep.Effect], list]:
    book, seen, batches = ep.Book(), [], []
    at, seq = T0, 0
    for kind, power, seconds in history:
        at += timedelta(seconds=seconds)
        if kind == "reading":
            seq += 1
            batches.append((seq, fact(power, at)))
            book, effects, _ = ep.on_fact(book, seq, fact(power, at), [rule], WORLD, at)
        else:
            book, effects, _ = ep.on_tick(book, {rule.id: rule}, WORLD, at)
        seen += effects
    return book, seen, batches


@settings(max_examples=200, deadline=None)
@given(history=steps, for_s=st.sampled_from([0.0, 10.0, 30.0]))
def test_no_episode_fires_twice(history: list[tuple[str, float, int]], for_s: float) -> None:
    _, effects, _ = play(threshold_rule(for_s=for_s), history)
    fired = Counter(r.episode.id for r in runs(effects) if r.kind == "fired")
    assert all(count == 1 for count in fired.values())


@settings(max_examples=200, deadline=None)
@given(history=steps)
def test_a_replayed_batch_changes_nothing(history: list[tuple[str, float, int]]) -> None:
    rule = threshold_rule(for_s=10)
    book, _, batches = play(rule, history)
    for seq, old in batches:  # delivered again after a recovery
        again = ep.on_fact(book, seq, old, [rule], WORLD, T0 + timedelta(hours=1))
        assert again == (book, [], [])


@settings(max_examples=200, deadline=None)
@given(
    held=st.integers(0, 29),
    ticks=st.lists(st.integers(0, 29), max_size=10),
)
def test_clearing_before_the_for_deadline_fires_nothing(held: int, ticks: list[int]) -> None:
    rule = threshold_rule(for_s=30)
    book, effects, _ = ep.on_fact(ep.Book(), 1, fact(60, T0), [rule], WORLD, T0)
    seen = list(effects)
    for second in sorted(t for t in ticks if t <= held):
        book, effects, _ = ep.on_tick(book, {"r1": rule}, WORLD, T0 + timedelta(seconds=second))
        seen += effects
    cleared = T0 + timedelta(seconds=held)
    book, effects, _ = ep.on_fact(book, 2, fact(0, cleared), [rule], WORLD, cleared)
    seen += effects
    book, effects, _ = ep.on_tick(book, {"r1": rule}, WORLD, T0 + timedelta(hours=1))
    seen += effects
    assert runs(seen) == []
    assert not any(isinstance(e, ep.Clear) for e in seen)
