"""What the recorder makes of platform facts: audit rows for alerts and notifications."""

from __future__ import annotations

import pytest

from libs import messages as m
from libs import subjects
from services.recorder.rows import Rows, from_system


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
