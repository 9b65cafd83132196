"""The transition facts of `libs.actor_batch.decide`: beside each state fact that changed a
device's state, connection or mark, the same fact on `system.device.<id>.transition` (what
the recorder audits); none for a change of attributes only."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from libs import actor_batch as ab
from libs import messages as m
from libs import subjects

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
NOW = T0 + timedelta(seconds=1)
# Online and reporting, its state `active`: a reading that changes a value changes nothing else.
ONLINE = m.DeviceSnapshot(
    device_id="d1",
    state="active",
    connection="online",
    attributes={"temperature": 20.0},
    last_seen=T0,
    version=5,
    last_seq=10,
)


def incoming(
    seq: int, kind: str, data: dict[str, Any] | None = None, *, source: str | None = None
) -> ab.Incoming:
    event = m.make_event("d1", kind, data, source=source, event_id=f"e-{seq}")
    return ab.Incoming(seq, T0 + timedelta(seconds=seq), event, ab.Standing.ACTIVE)


def by_subject(effects: ab.Effects) -> list[tuple[str, str]]:
    return [(subject, msg_id) for subject, _, msg_id in effects.facts]


@pytest.mark.parametrize(
    ("event", "changed"),
    [
        (incoming(11, "telemetry", {"temperature": 20.0, "on": False}), "state"),
        (incoming(11, "goodbye"), "connection"),
        (incoming(11, "presence_timeout", {"last_seen": T0.isoformat()}), "connection"),
        (incoming(11, "mark", {"rule_id": "r1", "state": "triggered"}), "mark"),
        (incoming(11, m.MOVED, {"home": "home-b"}, source="service/gateway"), "state"),
    ],
    ids=["state", "goodbye", "presence_timeout", "mark", "moved"],
)
def test_a_change_of_state_connection_or_mark_is_also_a_transition(
    event: ab.Incoming, changed: str
) -> None:
    _, effects = ab.decide({"d1": ONLINE}, [event], NOW)

    assert by_subject(effects) == [
        (subjects.device_state("d1"), "state:d1:6"),
        (subjects.device_transition("d1"), "transition:d1:6"),
    ]
    [(_, state_body, _), (_, transition_body, _)] = effects.facts
    assert transition_body == state_body  # the same fact, byte for byte
    fact = m.state_fact_decoder.decode(transition_body)
    assert changed in fact.changed and fact.cause_event_id == "e-11"


@pytest.mark.parametrize(
    "event",
    [
        incoming(11, "telemetry", {"temperature": 21.5}),
        incoming(11, "telemetry", {"humidity": 40}),
        # Moved while off: what it reported goes, its state stays `off`.
        incoming(11, m.MOVED, {"home": "home-b"}, source="service/gateway"),
    ],
    ids=["changed-value", "new-attribute", "moved-while-off"],
)
def test_a_change_of_attributes_only_is_a_state_fact_and_no_transition(
    event: ab.Incoming,
) -> None:
    before = ONLINE
    if event.event.type == m.MOVED:
        before = m.DeviceSnapshot(
            device_id="d1", state="off", connection="online", attributes={"on": False}, version=5
        )
    _, effects = ab.decide({"d1": before}, [event], NOW)

    assert by_subject(effects) == [(subjects.device_state("d1"), "state:d1:6")]


def test_a_batch_decided_again_on_the_same_state_gives_its_transitions_the_same_ids() -> None:
    """A crash before the commit: the batch is redelivered and decided again on the state
    committed before it; every fact's id is the same, so the stream drops the copies."""
    batch = [
        incoming(11, "telemetry", {"temperature": 21.0}),
        incoming(12, "goodbye"),
        incoming(13, "telemetry", {"temperature": 22.0}),
    ]
    _, first = ab.decide({"d1": ONLINE}, batch, NOW)
    _, again = ab.decide({"d1": ONLINE}, list(reversed(batch)), NOW + timedelta(seconds=5))

    assert (
        by_subject(first)
        == by_subject(again)
        == [
            (subjects.device_state("d1"), "state:d1:6"),
            (subjects.device_state("d1"), "state:d1:7"),
            (subjects.device_transition("d1"), "transition:d1:7"),
            (subjects.device_state("d1"), "state:d1:8"),
            (subjects.device_transition("d1"), "transition:d1:8"),
        ]
    )


def test_a_batch_redelivered_after_its_commit_sends_no_transition_again() -> None:
    """Its facts were stored before its state was committed: only the latest state fact is
    sent again (de-duplicated by its id), never a transition."""
    batch = [incoming(11, "goodbye")]
    committed, first = ab.decide({"d1": ONLINE}, batch, NOW)
    assert (subjects.device_transition("d1"), "transition:d1:6") in by_subject(first)

    _, again = ab.decide(committed, batch, NOW)

    assert by_subject(again) == [(subjects.device_state("d1"), "state:d1:6")]
