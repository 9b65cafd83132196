"""Attribute staleness without I/O: expected intervals, the scan's finding, how the actors
apply it, what the rules and the gauge make of it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from libs import capabilities
from libs import messages as m
from libs import rule_logic as rl
from libs.actor_batch import Incoming, Standing, decide
from libs.device_state import apply, overdue, presence
from libs.messages import DeviceSnapshot

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def ev(event_type: str, data: dict | None = None, source: str | None = None) -> m.CloudEvent:
    return m.make_event("d1", event_type, data, source=source)


def finding(stale: dict[str, datetime]) -> m.CloudEvent:
    data = {"stale": {name: at.isoformat() for name, at in stale.items()}}
    return ev("presence_timeout", data, source="service/actors")


def reporting(at: datetime = T0) -> DeviceSnapshot:
    """Online, `power_w` and `energy_wh` reported at `at`."""
    return apply(
        DeviceSnapshot("d1"), ev("telemetry", {"power_w": 5.0, "energy_wh": 1.0}), 1, at
    ).snapshot


def test_a_kind_has_default_intervals_that_the_registry_overrides_or_turns_off() -> None:
    assert capabilities.report_intervals("energy_meter") == {"power_w": 300.0, "energy_wh": 300.0}
    assert capabilities.report_intervals("light") == {}
    assert capabilities.report_intervals(
        "energy_meter", {"power_w": 10.0, "energy_wh": None, "t": 60.0}
    ) == {"power_w": 10.0, "t": 60.0}


def test_an_attribute_is_overdue_past_its_interval_only() -> None:
    reported = {"power_w": T0, "on": T0, "t": T0 + timedelta(seconds=9)}
    intervals = {"power_w": 10.0, "t": 10.0}
    assert overdue(intervals, reported, T0 + timedelta(seconds=10)) == {}
    assert overdue(intervals, reported, T0 + timedelta(seconds=11)) == {"power_w": T0}
    # Never reported: not judged; no interval (`on`): never overdue.
    assert overdue({"energy_wh": 1.0}, reported, T0 + timedelta(days=1)) == {}


def test_presence_is_stale_only_while_online() -> None:
    assert presence("online", ["power_w"]) == "stale"
    assert presence("online", []) == "online"
    assert presence("offline", ["power_w"]) == "offline"


def test_reports_are_timed_by_the_stream_and_not_a_change_on_their_own() -> None:
    first = reporting()
    assert first.reported == {"power_w": T0, "energy_wh": T0}
    later = T0 + timedelta(seconds=5)
    again = apply(first, ev("telemetry", {"power_w": 5.0}), 2, later)
    assert again.changed == []
    assert again.snapshot.reported == {"power_w": later, "energy_wh": T0}


def test_a_finding_makes_the_attribute_stale_and_a_report_makes_it_fresh() -> None:
    stale = apply(reporting(), finding({"power_w": T0}), 2, T0 + timedelta(seconds=30))
    assert stale.snapshot.stale == ["power_w"]
    assert stale.changed == ["stale"]
    assert stale.snapshot.connection == "online"  # a finding is not the device speaking

    fresh = apply(stale.snapshot, ev("telemetry", {"power_w": 6.0}), 3, T0 + timedelta(seconds=60))
    assert fresh.snapshot.stale == []
    assert "stale" in fresh.changed


def test_a_report_after_the_scan_wins_over_its_finding() -> None:
    report = ev("telemetry", {"power_w": 5.0})
    reported_since = apply(reporting(), report, 2, T0 + timedelta(seconds=9))
    result = apply(reported_since.snapshot, finding({"power_w": T0}), 3, T0 + timedelta(seconds=10))
    assert result.snapshot.stale == []
    assert result.changed == []


def test_an_attribute_left_out_of_a_finding_is_fresh_again() -> None:
    both = apply(reporting(), finding({"power_w": T0, "energy_wh": T0}), 2, T0).snapshot
    assert both.stale == ["energy_wh", "power_w"]
    # Its interval was raised (or turned off) in the registry.
    one = apply(both, finding({"power_w": T0}), 3, T0).snapshot
    assert one.stale == ["power_w"]


def test_going_offline_clears_staleness_and_a_heartbeat_timeout_keeps_it_unjudged() -> None:
    stale = apply(reporting(), finding({"power_w": T0}), 2, T0).snapshot
    gone = apply(stale, ev("goodbye"), 3, T0)
    assert gone.snapshot.stale == []
    assert set(gone.changed) == {"connection", "stale"}
    # A heartbeat timeout that finds the device spoke since changes nothing.
    before = (T0 - timedelta(seconds=1)).isoformat()
    timeout = ev("presence_timeout", {"last_seen": before}, "service/actors")
    assert apply(stale, timeout, 4, T0).snapshot.stale == ["power_w"]


def test_a_rules_event_is_not_the_device_reporting() -> None:
    published = ev("telemetry", {"power_w": 1.0}, source="rule/r1")
    result = apply(reporting(), published, 2, T0 + timedelta(seconds=50))
    assert result.snapshot.reported["power_w"] == T0


def test_the_state_fact_carries_the_stale_attributes() -> None:
    state = {"d1": reporting()}
    item = Incoming(2, T0, finding({"power_w": T0}), Standing.ACTIVE)
    _, effects = decide(state, [item], T0)
    _subject, body, msg_id = effects.facts[0]
    fact = m.state_fact_decoder.decode(body)
    assert fact.stale == ["power_w"] and fact.changed == ["stale"]
    assert msg_id == f"state:d1:{state['d1'].version + 1}"


def test_an_older_state_fact_without_stale_still_decodes() -> None:
    fact = m.DeviceStateFact(
        "d1", 1, "off", "online", {}, None, [], None, "e", "telemetry", None, T0
    )
    raw = msgspec.json.decode(m.encode(fact))
    del raw["stale"]
    assert m.state_fact_decoder.decode(msgspec.json.encode(raw)).stale == []


def stale_rule(**kw: str) -> m.Rule:
    trigger = m.StateTrigger(device_id="d1", attribute="connection", **kw)  # type: ignore[arg-type]
    action = m.NotifyAction(message="meter is stale")
    return m.Rule(id="r1", name="r", trigger=trigger, actions=[action], enabled=True, version=1)


def observed(connection: str, stale: bool, changed: list[str]) -> rl.Observation:
    fact = m.DeviceStateFact(
        "d1",
        2,
        "active",
        connection,  # type: ignore[arg-type]
        {"power_w": 5.0},
        T0,
        changed,
        "active",
        "e",
        "presence_timeout",
        None,
        T0,
        stale=["power_w"] if stale else [],
    )
    return rl.Observation.of(fact)


def test_a_rule_on_connection_stale_starts_when_stale_and_ends_when_fresh() -> None:
    rule = stale_rule(to="stale")
    episode, what = rl.step(None, rule, observed("online", True, ["stale"]), T0)
    assert what == "start" and episode is not None
    assert episode.values == {"connection": "stale"}
    _, what = rl.step(episode, rule, observed("online", False, ["stale"]), T0)
    assert what == "end"
    # Offline ends it too: staleness is an online device's.
    _, what = rl.step(episode, rule, observed("offline", False, ["connection"]), T0)
    assert what == "end"


def test_online_still_holds_while_an_attribute_is_stale() -> None:
    rule = stale_rule(to="online")
    episode, _ = rl.step(None, rule, observed("online", False, ["connection"]), T0)
    assert episode is not None
    assert rl.step(episode, rule, observed("online", True, ["stale"]), T0)[1] == "hold"


def test_stale_from_online_starts_and_from_stale_is_refused() -> None:
    rule = stale_rule(to="stale", **{"from_": "online"})
    assert rl.step(None, rule, observed("online", True, ["stale"]), T0)[1] == "start"
    with pytest.raises(ValueError, match="`from` must be one of online, offline"):
        m.StateTrigger(device_id="d1", attribute="connection", to="online", from_="stale")
    with pytest.raises(ValueError, match="`to` must be one of off, active, triggered"):
        m.StateTrigger(device_id="d1", attribute="state", to="stale")
