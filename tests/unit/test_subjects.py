import pytest

from libs import subjects


def test_device_event_subject_round_trips() -> None:
    s = subjects.device_events("kitchen-light", "telemetry")
    assert s == "events.kitchen-light.telemetry"
    assert subjects.parse_device_event(s) == ("kitchen-light", "telemetry")


def test_mqtt_topics_are_the_subjects_with_slashes() -> None:
    assert subjects.mqtt_topic(subjects.device_events("d-1", "telemetry")) == "events/d-1/telemetry"
    assert subjects.mqtt_topic(subjects.commands("d_1")) == "commands/d_1"


@pytest.mark.parametrize(
    "bad", ["events.a", "events.a.b.c", "commands.a.b", "events.a b.t", "events..t", "events.*.t"]
)
def test_parse_device_event_refuses_other_subjects(bad: str) -> None:
    with pytest.raises(ValueError, match="is not events"):
        subjects.parse_device_event(bad)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("events.>", True),
        ("events.*.telemetry", True),
        ("system.device.x.state", True),
        ("events.>.x", False),
        ("events..x", False),
        ("", False),
        ("events.a b", False),
        ("events.*", True),
        (">", True),
    ],
)
def test_filter_validation(value: str, ok: bool) -> None:
    assert subjects.is_filter(value) is ok


@pytest.mark.parametrize(
    ("pattern", "subject", "ok"),
    [
        ("events.>", "events.a.b", True),
        ("events.*.telemetry", "events.a.telemetry", True),
        ("events.*.telemetry", "events.a.state", False),
        ("events.>", "events", False),
        ("events.a.*", "events.a.b.c", False),
    ],
)
def test_wildcard_matching(pattern: str, subject: str, ok: bool) -> None:
    assert subjects.matches(pattern, subject) is ok


def test_stream_of_filter() -> None:
    assert subjects.stream_of("events.*.state") == "EVENTS"
    assert subjects.stream_of("system.>") == "SYSTEM"
    assert subjects.stream_of("other.>") is None
