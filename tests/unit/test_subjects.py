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


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        (
            subjects.device_events("lamp-1", "telemetry"),
            subjects.Classified(subjects.SubjectKind.DEVICE_EVENT, "lamp-1", "telemetry"),
        ),
        (subjects.commands("lamp-1"), (subjects.SubjectKind.COMMAND, "lamp-1", "", "")),
        (subjects.device_state("lamp-1"), (subjects.SubjectKind.DEVICE_STATE, "lamp-1", "", "")),
        (
            subjects.device_transition("lamp-1"),
            (subjects.SubjectKind.DEVICE_TRANSITION, "lamp-1", "", ""),
        ),
        (
            subjects.device_registry("lamp-1"),
            (subjects.SubjectKind.DEVICE_REGISTRY, "lamp-1", "", ""),
        ),
        (
            subjects.device_rejected("lamp-1"),
            (subjects.SubjectKind.DEVICE_REJECTED, "lamp-1", "", ""),
        ),
        (subjects.rule_fired("r1"), (subjects.SubjectKind.RULE_FIRED, "r1", "", "")),
        (subjects.rule_changed("r1"), (subjects.SubjectKind.RULE_CHANGED, "r1", "", "")),
        (subjects.notification("s1"), (subjects.SubjectKind.NOTIFICATION, "s1", "", "")),
        (subjects.alert("a1"), (subjects.SubjectKind.ALERT, "a1", "", "")),
        (
            subjects.location_changed("home"),
            (subjects.SubjectKind.LOCATION_CHANGED, "home", "", ""),
        ),
        (
            "system.subscription.s1.changed",
            (subjects.SubjectKind.SUBSCRIPTION_CHANGED, "s1", "", ""),
        ),
        (subjects.user_changed("u1"), (subjects.SubjectKind.USER_CHANGED, "u1", "", "")),
        (subjects.api_key_changed("k1"), (subjects.SubjectKind.API_KEY_CHANGED, "k1", "", "")),
        (
            subjects.credentials_changed("d1"),
            (subjects.SubjectKind.CREDENTIALS_CHANGED, "d1", "", ""),
        ),
        (subjects.bridge_changed("b1"), (subjects.SubjectKind.BRIDGE_CHANGED, "b1", "", "")),
        (
            subjects.provisioning_token_changed("t1"),
            (subjects.SubjectKind.PROVISIONING_CHANGED, "t1", "", ""),
        ),
        (
            subjects.deadletter_changed(42),
            (subjects.SubjectKind.DEADLETTER_CHANGED, "42", "", ""),
        ),
        (
            subjects.deadletter("events.lamp-1.telemetry"),
            (subjects.SubjectKind.DEAD_LETTER, "", "", "events.lamp-1.telemetry"),
        ),
    ],
)
def test_classify_names_what_a_subject_carries(subject: str, expected: subjects.Classified) -> None:
    assert subjects.classify(subject) == expected


def test_classify_reads_a_dead_letters_original_subject() -> None:
    dead = subjects.classify(subjects.deadletter(subjects.device_events("d1", "state")))
    assert subjects.classify(dead.original).kind is subjects.SubjectKind.DEVICE_EVENT


@pytest.mark.parametrize(
    "subject",
    [
        "",
        "events.a",
        "events.a.b.c",
        "events.*.telemetry",
        "commands.a.b",
        "system.device.a.unknown",
        "system.rule.r1",
        "system.device..state",
        "deadletter",
        "provision.d1.nonce",
        "_INBOX.svc.gateway",
    ],
)
def test_classify_calls_other_shapes_other(subject: str) -> None:
    assert subjects.classify(subject).kind is subjects.SubjectKind.OTHER


def test_classify_tells_a_users_change_from_other_facts() -> None:
    assert subjects.classify(subjects.rule_changed("r1")).is_change
    assert subjects.classify(subjects.location_changed("home")).is_change
    assert not subjects.classify(subjects.rule_fired("r1")).is_change
    assert not subjects.classify(subjects.device_state("d1")).is_change


@pytest.mark.parametrize(
    ("stored", "published"),
    [
        ("events.~.7.lamp-1.telemetry", "events.lamp-1.telemetry"),
        ("events.~.7.7.7", "events.7.7"),  # a device and a type like partitions
        ("events.lamp-1.telemetry.7", "events.lamp-1.telemetry"),  # partition last
        ("events.lamp-1.telemetry", "events.lamp-1.telemetry"),  # stored before partitions
        ("system.device.lamp-1.state", "system.device.lamp-1.state"),
        ("commands.lamp-1", "commands.lamp-1"),
    ],
)
def test_a_stored_event_subject_is_given_back_as_published(stored: str, published: str) -> None:
    assert subjects.published(stored) == published


@pytest.mark.parametrize(
    ("published", "first", "last"),
    [
        ("events.*.power", "events.~.*.*.power", "events.*.power.*"),
        ("events.lamp-1.telemetry", "events.~.*.lamp-1.telemetry", "events.lamp-1.telemetry.*"),
        ("events.lamp-1.*", "events.~.*.lamp-1.*", "events.lamp-1.*.*"),
        ("events.lamp-1.>", "events.~.*.lamp-1.>", "events.lamp-1.>"),
        ("events.*.>", "events.*.>", "events.*.>"),
        ("events.>", "events.>", "events.>"),
        ("system.device.*.state", "system.device.*.state", "system.device.*.state"),
    ],
)
def test_a_filter_on_published_events_matches_their_stored_subjects_in_either_layout(
    published: str, first: str, last: str
) -> None:
    assert subjects.stored_filter(published) == first
    assert subjects.stored_filter(published, first=False) == last
    for event in ("events.lamp-1.power", "events.lamp-2.telemetry", "events.7.power"):
        device, kind = event.split(".")[1:]
        expected = subjects.matches(published, event)
        assert subjects.matches(first, f"events.~.3.{device}.{kind}") is expected
        assert subjects.matches(last, f"events.{device}.{kind}.3") is expected
        # Neither layout's filter takes the other's subjects (`~` is no device id).
        if first != published:
            assert not subjects.matches(first, f"events.{device}.{kind}.3")
        if last != published:
            assert not subjects.matches(last, f"events.~.3.{device}.{kind}")


def test_a_partitions_filter_takes_its_own_events_only_in_either_layout() -> None:
    assert subjects.matches(subjects.events_partition(3), "events.~.3.lamp-1.telemetry")
    assert not subjects.matches(subjects.events_partition(3), "events.~.4.lamp-1.telemetry")
    assert not subjects.matches(subjects.events_partition(3), "events.lamp-1.telemetry.3")
    last = subjects.events_partition(3, first=False)
    assert subjects.matches(last, "events.lamp-1.telemetry.3")
    assert not subjects.matches(last, "events.~.3.lamp-1.telemetry")


def test_the_partition_count_and_layout_are_read_back_from_the_transform() -> None:
    source, destination = subjects.partitioned(16)
    assert source == "events.*.*"
    assert subjects.transform_partitions(destination) == 16
    assert subjects.transform_partition_first(destination)
    _, before = subjects.partitioned(8, first=False)
    assert subjects.transform_partitions(before) == 8
    assert not subjects.transform_partition_first(before)
    assert subjects.transform_partitions("events.{{wildcard(1)}}") is None
    assert subjects.transform_partitions("other.{{partition(16,1)}}.{{wildcard(1)}}") is None
