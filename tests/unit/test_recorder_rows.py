"""What the recorder makes of platform facts: audit rows for alerts and notifications."""

from __future__ import annotations

import pytest

from libs import messages as m
from libs import subjects
from services.recorder.rows import Rows, from_command, from_system


@pytest.mark.parametrize(
    "subject", [subjects.alert("rule-1"), subjects.notification("sub-1")], ids=["alert", "notify"]
)
def test_a_rules_alert_is_audited_whoever_it_goes_to(subject: str) -> None:
    alert = m.make_event(
        "meter-1",
        "alert",
        {"rule_id": "rule-1", "message": "drawing power too long", "severity": "warning"},
        source="rule/rule-1",
        correlation_id="episode-1",
    )
    rows = Rows()

    from_system(rows, subject, m.encode(alert), ("SYSTEM", 42))

    [entry] = rows.audit
    assert entry["actor"] == "rule:rule-1"
    assert entry["action"] == "alert.raised"
    assert entry["device_id"] == "meter-1"
    assert entry["result"] == "warning"
    assert entry["correlation_id"] == "episode-1"
    assert entry["source_seq"] == 42


def test_a_location_change_is_audited_with_who_made_it() -> None:
    fact = m.ChangeFact(
        what="location",
        id="kitchen",
        change="created",
        actor="user:anonymous",
        correlation_id="c-1",
        time=m.now(),
        detail={"id": "kitchen", "path": "home/kitchen"},
    )
    rows = Rows()

    from_system(rows, subjects.location_changed("kitchen"), m.encode(fact), ("SYSTEM", 7))

    [entry] = rows.audit
    assert (entry["actor"], entry["action"], entry["result"]) == (
        "user:anonymous",
        "location.created",
        "ok",
    )
    assert entry["device_id"] is None
    assert entry["detail"] == {
        "id": "kitchen",
        "location": {"id": "kitchen", "path": "home/kitchen"},
    }


def test_each_command_on_the_bus_is_a_command_record_once() -> None:
    command = m.Command(
        id="cmd-1",
        device_id="light-1",
        action="turn_off",
        params={},
        issued_at=m.now(),
        expires_at=m.now(),
        issued_by="rule:r1",
        correlation_id="episode-1",
    )
    rows = Rows()

    from_command(rows, m.encode(command), ("COMMANDS", 3))
    from_command(rows, m.encode(command), ("COMMANDS", 4))  # stored twice (after the window)

    assert list(rows.commands) == ["cmd-1"]
    assert rows.commands["cmd-1"]["issued_by"] == "rule:r1"
    assert rows.commands["cmd-1"]["status"] == "pending"
    assert [a["action"] for a in rows.audit] == ["command.sent", "command.sent"]


def test_a_rule_or_subscription_change_is_audited() -> None:
    rows = Rows()
    for subject, what in (
        (subjects.rule_changed("r1"), "rule"),
        ("system.subscription.s1.changed", "subscription"),
    ):
        fact = m.ChangeFact(
            what=what,  # type: ignore[arg-type]
            id=subject.split(".")[2],
            change="deleted",
            actor="user:anonymous",
            correlation_id="c-2",
            time=m.now(),
            detail={"name": "x"},
        )
        from_system(rows, subject, m.encode(fact), ("SYSTEM", 9))

    assert [(e["action"], e["detail"]["id"]) for e in rows.audit] == [
        ("rule.deleted", "r1"),
        ("subscription.deleted", "s1"),
    ]


def test_an_alert_with_long_texts_fits_the_audit_columns() -> None:
    """Anyone on the bus can publish an alert: a row too long for its column would be
    refused by Postgres, and the recorder would retry it forever."""
    alert = m.make_event("meter-1", "alert", {"severity": "s" * 500}, source="x" * 256)
    rows = Rows()

    from_system(rows, subjects.alert("a1"), m.encode(alert), ("SYSTEM", 5))

    [entry] = rows.audit
    assert (len(entry["actor"]), len(entry["result"])) == (200, 200)


def test_an_audit_row_says_what_was_acted_on_why_and_which_event_caused_it() -> None:
    state = m.DeviceStateFact(
        device_id="lamp",
        version=3,
        state="off",
        connection="offline",
        attributes={},
        last_seen=None,
        changed=["connection"],
        previous_state="off",
        cause_event_id="evt-9",
        cause_type="presence_timeout",
        correlation_id="c-9",
        time=m.now(),
    )
    fired = m.RuleFired(
        rule_id="r1",
        episode_id="e1",
        kind="fired",
        device_id="meter",
        reason="power_w above 5 for 10s",
        values={"power_w": 60.0},
        outcomes=[],
        trigger_event_id="evt-7",
        correlation_id="c-7",
        time=m.now(),
    )
    change = m.ChangeFact(
        what="rule", id="r1", change="updated", actor="user:alice", correlation_id="c", time=m.now()
    )
    rows = Rows()

    from_system(rows, subjects.device_transition("lamp"), m.encode(state), ("SYSTEM", 1))
    from_system(rows, subjects.rule_fired("r1"), m.encode(fired), ("SYSTEM", 2))
    from_system(rows, subjects.rule_changed("r1"), m.encode(change), ("SYSTEM", 3))

    assert [(a["actor"], a["target"], a["reason"], a["cause_id"]) for a in rows.audit] == [
        ("platform:actors", "device:lamp", "presence_timeout", "evt-9"),
        ("rule:r1", "device:meter", "power_w above 5 for 10s", "evt-7"),
        ("user:alice", "rule:r1", None, None),
    ]


def test_a_command_names_who_sent_it_and_targets_the_command() -> None:
    command = m.Command(
        id="cmd-1",
        device_id="lamp",
        action="turn_off",
        params={},
        issued_at=m.now(),
        expires_at=m.now(),
        issued_by="user:alice",
        correlation_id="c-1",
    )
    rows = Rows()

    from_command(rows, m.encode(command), ("COMMANDS", 5))

    [entry] = rows.audit
    assert (entry["actor"], entry["target"], entry["device_id"]) == (
        "user:alice",
        "command:cmd-1",
        "lamp",
    )


@pytest.mark.parametrize(
    ("changed", "audited"),
    [
        (["temperature"], False),
        (["temperature", "stale"], False),
        ([], False),
        (["state"], True),
        (["temperature", "connection"], True),
        (["mark"], True),
    ],
)
def test_a_transition_is_audited_when_its_state_connection_or_mark_changed_a_state_fact_never(
    changed: list[str], audited: bool
) -> None:
    fact = m.DeviceStateFact(
        device_id="lamp",
        version=4,
        state="active",
        connection="online",
        attributes={"temperature": 21.5},
        last_seen=m.now(),
        changed=changed,
        previous_state="off",
        cause_event_id="evt-4",
        cause_type="telemetry",
        correlation_id=None,
        time=m.now(),
    )
    rows = Rows()
    from_system(rows, subjects.device_state("lamp"), m.encode(fact), ("SYSTEM", 4))
    assert rows.empty  # its transition, if any, is the one audited
    from_system(rows, subjects.device_transition("lamp"), m.encode(fact), ("SYSTEM", 5))

    assert len(rows.audit) == (1 if audited else 0)
    assert not (rows.history or rows.rule_runs or rows.commands)
    if audited:
        assert rows.audit[0]["detail"] == {"version": 4, "changed": changed, "cause": "telemetry"}
