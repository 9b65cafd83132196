"""The recorder's consumer of SYSTEM reads exactly what it records (`libs.bus`'s filters
against `services.recorder.rows.from_system`): every kind of system fact is tried, so a new
one the recorder records but its filters leave out fails here, not silently in production."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from libs import bus, subjects
from libs import messages as m
from libs.subjects import SubjectKind
from services.recorder.rows import Rows, from_system

FILTERS = bus.RECORDER_SOURCES[subjects.SYSTEM_STREAM]


def _state_fact() -> bytes:
    # One the recorder would audit, were it to read it: its connection changed.
    return m.encode(
        m.DeviceStateFact(
            device_id="x1",
            version=2,
            state="off",
            connection="offline",
            attributes={},
            last_seen=None,
            changed=["connection"],
            previous_state="active",
            cause_event_id="e-1",
            cause_type="goodbye",
            correlation_id=None,
            time=m.now(),
        )
    )


def _change_fact() -> bytes:
    return m.encode(
        m.ChangeFact(
            what="rule", id="x1", change="updated", actor="user:a", correlation_id="c", time=m.now()
        )
    )


def _alert() -> bytes:
    return m.encode(m.make_event("x1", "alert", {"severity": "warning"}, source="rule/r1"))


# A payload of each kind of system fact (`subjects.SYSTEM_KINDS`). A kind added there needs one
# here: the test says so rather than pass without it.
PAYLOADS: dict[SubjectKind, Callable[[], bytes]] = {
    SubjectKind.DEVICE_STATE: _state_fact,
    SubjectKind.DEVICE_TRANSITION: _state_fact,
    SubjectKind.DEVICE_REGISTRY: lambda: m.encode(
        m.RegistryFact(
            device_id="x1",
            change=m.RegistryChange.CREATED,
            actor="user:a",
            correlation_id="c",
            time=m.now(),
        )
    ),
    SubjectKind.DEVICE_REJECTED: lambda: m.encode(
        m.RejectedFact(
            device_id="x1",
            event_id="e-1",
            event_type="telemetry",
            reason="device is not registered",
            correlation_id=None,
            time=m.now(),
        )
    ),
    SubjectKind.RULE_FIRED: lambda: m.encode(
        m.RuleFired(
            rule_id="x1",
            episode_id="ep-1",
            kind="fired",
            device_id="d1",
            reason="r",
            values={},
            outcomes=[],
            trigger_event_id=None,
            correlation_id="c",
            time=m.now(),
        )
    ),
    SubjectKind.ALERT: _alert,
    SubjectKind.NOTIFICATION: _alert,
    **dict.fromkeys(subjects.CHANGE_KINDS, _change_fact),
}


def example(kind: SubjectKind) -> str:
    """A subject of that kind (`system.device.x1.registry`, `system.alert.x1`)."""
    subject = subjects.kind_filter(kind).replace("*", "x1")
    assert subjects.classify(subject).kind is kind
    return subject


def recorded(subject: str, data: bytes) -> bool:
    rows = Rows()
    from_system(rows, subject, data, (subjects.SYSTEM_STREAM, 1))
    return not rows.empty


def read(subject: str) -> bool:
    return any(subjects.matches(f, subject) for f in FILTERS)


@pytest.mark.parametrize("kind", sorted(subjects.SYSTEM_KINDS), ids=str)
def test_the_recorder_reads_each_kind_of_system_fact_it_records_and_no_other(
    kind: SubjectKind,
) -> None:
    assert kind in PAYLOADS, f"no example payload of {kind}: add one to PAYLOADS"
    subject = example(kind)

    assert read(subject) == recorded(subject, PAYLOADS[kind]()), subject


def test_the_recorder_reads_no_state_fact_but_every_transition() -> None:
    assert not read(subjects.device_state("x1"))
    assert read(subjects.device_transition("x1"))
    assert subjects.DEVICE_TRANSITIONS_ALL in FILTERS


def test_its_filters_are_distinct_and_overlap_nowhere() -> None:
    """nats-server refuses a consumer whose filters overlap."""
    assert len(set(FILTERS)) == len(FILTERS)
    for a in FILTERS:
        for b in FILTERS:
            if a != b:
                assert not subjects.matches(a, b.replace("*", "x1")), (a, b)
