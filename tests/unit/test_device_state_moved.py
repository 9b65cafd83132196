"""A device moved to another home starts afresh there: its `moved` event (the gateway's, on
the device's own subject, queued with the move) clears what it reported in the old home from
its state, is no reading, and is the new home's to see."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import cast

import msgspec
import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from libs import messages as m
from libs import subjects
from libs.actor_batch import Standing, refusal, state_fact
from libs.db.models import Device as DeviceRow
from libs.db.models import OutboxMessage
from libs.device_state import PLATFORM_SOURCES, Unapplicable, apply
from libs.homes import DEVICE, HomeIndex
from libs.messages import DeviceSnapshot
from services.gateway.devices import service as devices
from services.recorder.rows import Rows, from_event

T0 = datetime(2026, 1, 1, tzinfo=UTC)
MOVED_AT = T0 + timedelta(minutes=5)


def moved(home: str | None = "b", source: str = "service/gateway") -> m.CloudEvent:
    data = msgspec.to_builtins(m.MovedData(home=home))
    return m.make_event("lamp", m.MOVED, data, source=source)


def lamp_in_a() -> DeviceSnapshot:
    """A lamp that reported in its old home, online, marked by a rule, one attribute stale."""
    return DeviceSnapshot(
        "lamp",
        state="triggered",
        mark="triggered",
        connection="online",
        attributes={"on": True, "power_w": 60.0},
        last_seen=T0,
        version=4,
        last_seq=9,
        reported={"on": T0, "power_w": T0},
        stale=["power_w"],
    )


def test_a_moved_device_keeps_none_of_what_it_reported_in_its_old_home() -> None:
    result = apply(lamp_in_a(), moved(), seq=10, received=MOVED_AT)

    after = result.snapshot
    assert (after.attributes, after.reported, after.stale) == ({}, {}, [])
    assert after.last_seen == T0  # its presence is still judged from it
    assert (after.connection, after.mark, after.state) == ("online", "triggered", "triggered")
    assert (after.version, after.last_seq) == (5, 10)
    assert result.changed == ["attributes", "stale"]


def test_a_moved_device_left_active_by_its_readings_is_off() -> None:
    unmarked = msgspec.structs.replace(lamp_in_a(), mark=None, state="active")

    result = apply(unmarked, moved(), seq=10, received=MOVED_AT)

    assert result.snapshot.state == "off"
    assert result.changed == ["state", "attributes", "stale"]


def test_a_moved_devices_fact_has_no_state_before_in_its_new_home() -> None:
    """A rule `from: active` of the new home is not met by the move (it never saw it so)."""
    unmarked = msgspec.structs.replace(lamp_in_a(), mark=None, state="active")
    result = apply(unmarked, moved(), seq=10, received=MOVED_AT)

    _, body, _ = state_fact(result.snapshot, unmarked.state, result.changed, moved(), MOVED_AT)

    fact = m.state_fact_decoder.decode(body)
    assert (fact.state, fact.previous_state) == ("off", None)


def test_a_move_of_a_device_that_reported_nothing_changes_nothing() -> None:
    empty = DeviceSnapshot("lamp", connection="online", version=2, last_seq=3)

    result = apply(empty, moved(None), seq=4, received=MOVED_AT)

    assert result.changed == []
    assert result.snapshot == msgspec.structs.replace(empty, last_seq=4)


def test_a_device_calling_its_own_event_moved_only_speaks() -> None:
    """Only the platform moves a device: from the device, `moved` is one of its own types."""
    result = apply(lamp_in_a(), moved(source="device/lamp"), seq=10, received=MOVED_AT)

    assert result.snapshot.attributes == {"on": True, "power_w": 60.0}
    assert result.snapshot.last_seen == MOVED_AT


def test_a_move_whose_data_names_no_home_is_unapplicable() -> None:
    event = m.make_event("lamp", m.MOVED, {}, source="service/gateway")

    with pytest.raises(Unapplicable, match="home"):
        apply(lamp_in_a(), event, seq=10, received=MOVED_AT)


@pytest.mark.parametrize("standing", [Standing.DISCONNECTED, Standing.PENDING, Standing.REJECTED])
def test_a_move_is_applied_whatever_the_devices_standing(standing: Standing) -> None:
    assert refusal(m.MOVED, standing) is None
    assert refusal(m.MOVED, None) == "device is not registered"


def test_a_move_is_no_reading_in_the_devices_history() -> None:
    """The move is audited through its registry fact; its event writes nothing."""
    event = moved()
    rows = Rows()

    from_event(rows, event.nats_subject, m.encode(event), ("EVENTS", 11), MOVED_AT)

    assert rows.empty


# --- the event as the gateway queues it with the move ------------------------------------------


class Queued:
    """A session that keeps what the outbox writes into it, in order (nothing is committed)."""

    def __init__(self) -> None:
        self.info: dict[str, object] = {}
        self.rows: list[OutboxMessage] = []

    def add(self, row: OutboxMessage) -> None:
        self.rows.append(row)


def test_a_moves_event_is_queued_after_its_fact_and_is_the_new_homes() -> None:
    """Dated at the placement, the event goes to the new home's feeds and webhooks only."""
    lamp = DeviceRow(
        id="lamp",
        name="Lamp",
        kind="light",
        location="b/hall",
        lifecycle="active",
        enabled=True,
        metadata_={},
        created_at=T0,
        updated_at=MOVED_AT,
        home_since=MOVED_AT,
    )
    session = Queued()
    index = HomeIndex()
    index.set(DEVICE, "lamp", "a")
    in_a = m.encode(msgspec.structs.replace(m.make_event("lamp", "telemetry"), time=T0))

    devices._record(cast(AsyncSession, session), lamp, "updated", "user:alice", "move-1")
    devices._announce_move(cast(AsyncSession, session), lamp, "move-1")

    fact, queued = session.rows
    assert fact.subject == subjects.device_registry("lamp")
    assert queued.subject == subjects.device_events("lamp", m.MOVED)
    event = m.cloud_event_decoder.decode(queued.payload)
    assert (event.data, event.time, event.correlationid) == ({"home": "b"}, MOVED_AT, "move-1")
    assert event.source.startswith(PLATFORM_SOURCES)
    index.learn(fact.subject, fact.payload)
    assert index.home_at_once(queued.subject, queued.payload) == "b"
    assert index.home_at_once(subjects.device_events("lamp", "telemetry"), in_a) is None
