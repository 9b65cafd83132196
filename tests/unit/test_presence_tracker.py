"""The presence tracker without I/O: when a device is next looked at, what is found then,
and entries superseded by newer deadlines skipped (fake clock, no bus)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec

from libs.actor_batch import Standing
from libs.messages import DeviceSnapshot
from services.actors.presence import PresenceTracker, _staleness, _timeout, due_at, judge

T0 = datetime(2026, 1, 1, tzinfo=UTC)
TIMEOUT = 30.0
METER = {"power_w": 10.0}


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def online(seen: float = 0.0, **reported: float) -> DeviceSnapshot:
    return DeviceSnapshot(
        "d1",
        connection="online",
        last_seen=at(seen),
        version=3,
        reported={name: at(s) for name, s in reported.items()},
    )


def tracker() -> PresenceTracker:
    return PresenceTracker(TIMEOUT, lambda d: True)


def test_due_is_the_earliest_of_going_offline_and_an_attribute_going_stale() -> None:
    assert due_at(online(5.0), Standing.ACTIVE, {}, TIMEOUT) == at(35.0).timestamp()
    device = online(5.0, power_w=2.0, on=0.0)  # `on` has no interval: never stale
    assert due_at(device, Standing.ACTIVE, METER, TIMEOUT) == at(12.0).timestamp()
    # Already stale: only its going offline is left to look for.
    stale = msgspec.structs.replace(device, stale=["power_w"])
    assert due_at(stale, Standing.ACTIVE, METER, TIMEOUT) == at(35.0).timestamp()


def test_offline_or_not_active_devices_are_not_tracked_and_unknown_intervals_are_due_now() -> None:
    assert due_at(DeviceSnapshot("d1"), Standing.ACTIVE, {}, TIMEOUT) is None
    for standing in (Standing.DISCONNECTED, Standing.PENDING, Standing.REJECTED, None):
        assert due_at(online(), standing, {}, TIMEOUT) is None
    assert due_at(online(), Standing.ACTIVE, None, TIMEOUT) == 0.0


def test_a_deadline_pushed_back_is_looked_at_early_and_a_superseded_entry_is_skipped() -> None:
    t = tracker()
    t.update(online(0.0), Standing.ACTIVE, {})  # due at 30
    t.update(online(10.0), Standing.ACTIVE, {})  # spoke: due at 40, the entry at 30 stays
    assert t.pop(at(29.0).timestamp()) == []
    assert t.pop(at(31.0).timestamp()) == ["d1"]  # looked at early, judged, put back
    assert len(t) == 0
    t.update(online(10.0), Standing.ACTIVE, {})
    t.update(online(10.0, power_w=10.0), Standing.ACTIVE, METER)  # earlier: due at 20
    assert t.pop(at(21.0).timestamp()) == ["d1"]
    assert t.pop(at(100.0).timestamp()) == []  # its entry at 40 was superseded


def test_a_device_gone_offline_or_woken_is_rescheduled_without_a_duplicate() -> None:
    t = tracker()
    t.update(online(0.0), Standing.ACTIVE, {})
    t.update(DeviceSnapshot("d1"), Standing.ACTIVE, {})  # said goodbye
    assert t.pop(at(100.0).timestamp()) == []
    t.update(online(0.0), Standing.ACTIVE, {})
    t.wake("d1")  # its registry entry changed
    assert t.pop(at(1.0).timestamp()) == ["d1"]
    assert t.pop(at(100.0).timestamp()) == []


def test_the_heap_of_superseded_entries_is_compacted() -> None:
    t = tracker()
    for n in range(3000):
        t.schedule("d1", 3000.0 - n)  # always earlier: a new entry each time
    assert len(t) == 1 and len(t._heap) < 1100
    assert t.pop(5000.0) == ["d1"]


def test_a_silent_device_times_out_and_is_not_also_judged_stale() -> None:
    device = online(0.0, power_w=0.0)
    finding, then = judge(device, Standing.ACTIVE, METER, TIMEOUT, at(31.0))
    assert finding is not None and finding.id == _timeout("d1", at(0.0)).id
    assert finding.data == {"last_seen": at(0.0).isoformat()}
    assert then.connection == "offline"  # not looked at again until it speaks
    assert due_at(then, Standing.ACTIVE, METER, TIMEOUT) is None
    # At the timeout exactly it has not timed out yet (as before: strictly longer).
    assert judge(online(0.0), Standing.ACTIVE, {}, TIMEOUT, at(30.0))[0] is None


def test_an_overdue_attribute_is_found_once_and_the_next_deadline_is_the_timeout() -> None:
    device = online(15.0, power_w=0.0)
    assert judge(device, Standing.ACTIVE, METER, TIMEOUT, at(10.0))[0] is None
    finding, then = judge(device, Standing.ACTIVE, METER, TIMEOUT, at(11.0))
    assert finding is not None
    assert finding.id == _staleness("d1", 3, {"power_w": at(0.0)}).id
    assert finding.data == {"stale": {"power_w": at(0.0).isoformat()}}
    assert then.stale == ["power_w"]
    assert due_at(then, Standing.ACTIVE, METER, TIMEOUT) == at(45.0).timestamp()
    # Its state fact says stale: nothing more to find.
    assert judge(then, Standing.ACTIVE, METER, TIMEOUT, at(20.0))[0] is None


def test_an_interval_turned_off_makes_a_stale_attribute_fresh_again() -> None:
    stale = msgspec.structs.replace(online(15.0, power_w=0.0), stale=["power_w"])
    finding, then = judge(stale, Standing.ACTIVE, {}, TIMEOUT, at(20.0))
    assert finding is not None and finding.data == {"stale": {}}
    assert then.stale == []


def test_devices_not_applied_are_not_judged() -> None:
    device = online(0.0, power_w=0.0)
    for standing in (Standing.DISCONNECTED, Standing.PENDING, None):
        assert judge(device, standing, METER, TIMEOUT, at(100.0))[0] is None
    assert judge(DeviceSnapshot("d1"), Standing.ACTIVE, METER, TIMEOUT, at(100.0))[0] is None
