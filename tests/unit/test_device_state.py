"""A device's state from its events, without I/O: apply(snapshot, event) -> new snapshot."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from libs import messages as m
from libs.device_state import Unapplicable, apply, derive_state
from libs.messages import DeviceSnapshot

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def ev(event_type: str, data: dict | None = None) -> m.CloudEvent:
    return m.make_event("d1", event_type, data)


def test_telemetry_merges_attributes_and_bumps_version() -> None:
    s = DeviceSnapshot("d1", attributes={"energy_wh": 1.0})
    result = apply(s, ev("telemetry", {"power_w": 60.0}), seq=7, received=T0)
    assert result.snapshot.attributes == {"energy_wh": 1.0, "power_w": 60.0}
    assert result.snapshot.version == 1
    assert result.snapshot.last_seq == 7
    assert result.snapshot.connection == "online"
    assert result.snapshot.last_seen == T0
    assert set(result.changed) == {"attributes", "state", "connection"}


def test_same_reading_twice_is_not_a_change() -> None:
    first = apply(DeviceSnapshot("d1"), ev("telemetry", {"t": 20}), 1, T0).snapshot
    second = apply(first, ev("telemetry", {"t": 20}), 2, T0 + timedelta(seconds=1))
    assert second.changed == []
    assert second.snapshot.version == first.version
    assert second.snapshot.last_seq == 2  # applied, so a redelivery is recognised


def test_goodbye_takes_device_offline() -> None:
    online = apply(DeviceSnapshot("d1"), ev("hello"), 1, T0).snapshot
    result = apply(online, ev("goodbye"), 2, T0)
    assert result.snapshot.connection == "offline"
    assert result.changed == ["connection"]


def test_presence_timeout_ignored_when_device_spoke_since() -> None:
    online = apply(DeviceSnapshot("d1"), ev("heartbeat"), 1, T0).snapshot
    stale = ev("presence_timeout", {"last_seen": (T0 - timedelta(seconds=5)).isoformat()})
    assert apply(online, stale, 2, T0).snapshot.connection == "online"
    due = ev("presence_timeout", {"last_seen": T0.isoformat()})
    assert apply(online, due, 3, T0).snapshot.connection == "offline"


def test_mark_triggers_and_clears_without_touching_presence() -> None:
    s = apply(DeviceSnapshot("d1"), ev("telemetry", {"power_w": 60}), 1, T0).snapshot
    marked = apply(s, ev("mark", {"rule_id": "r", "state": "triggered"}), 2, T0 + timedelta(1))
    assert marked.snapshot.state == "triggered"
    assert marked.snapshot.last_seen == T0
    cleared = apply(marked.snapshot, ev("mark", {"rule_id": "r", "state": None}), 3, T0)
    assert cleared.snapshot.state == "active"


def test_command_status_is_returned_for_the_command_record() -> None:
    data = {"command_id": "c1", "status": "done"}
    result = apply(DeviceSnapshot("d1"), ev("command_status", data), 1, T0)
    assert result.command_status == m.CommandStatusData("c1", "done")


@pytest.mark.parametrize(
    ("event_type", "data", "field"),
    [
        ("telemetry", {"power_w": [1, 2]}, "$.data.power_w"),
        ("command_status", {"command_id": "c", "status": "maybe"}, "$.data.status"),
        ("mark", {"rule_id": "r", "state": "on", "x": 1}, "$.data"),
    ],
)
def test_unapplicable_data_names_the_field(event_type: str, data: dict, field: str) -> None:
    with pytest.raises(Unapplicable) as info:
        apply(DeviceSnapshot("d1"), ev(event_type, data), 1, T0)
    assert field in str(info.value)


@pytest.mark.parametrize(
    ("mark", "attributes", "state"),
    [
        (None, {}, "off"),
        (None, {"on": True, "power_w": 60}, "active"),
        (None, {"on": False}, "off"),
        (None, {"power_w": 0}, "off"),
        (None, {"temperature_c": 20}, "active"),
        ("triggered", {"power_w": 0}, "triggered"),
    ],
)
def test_derived_state(mark: str | None, attributes: dict, state: str) -> None:
    assert derive_state(mark, attributes) == state
