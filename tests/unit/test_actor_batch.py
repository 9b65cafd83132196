"""The actors' batch decision without I/O (`libs.actor_batch`): refusals, duplicates by stream
sequence, applying events, the facts to publish; and its properties under replay."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from libs import actor_batch as ab
from libs import messages as m
from libs import subjects

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
NOW = T0 + timedelta(seconds=1)
ACTIVE = ab.Standing.ACTIVE


def event(
    device: str, seq: int, data: dict[str, Any] | None = None, *, kind: str = "telemetry"
) -> m.CloudEvent:
    return m.make_event(device, kind, data, event_id=f"e-{device}-{seq}")


def incoming(
    device: str,
    seq: int,
    data: dict[str, Any] | None = None,
    *,
    kind: str = "telemetry",
    standing: ab.Standing | None = ACTIVE,
) -> ab.Incoming:
    return ab.Incoming(
        seq, T0 + timedelta(milliseconds=seq), event(device, seq, data, kind=kind), standing
    )


def fact_ids(effects: ab.Effects) -> list[str]:
    return [msg_id for _, _, msg_id in effects.facts]


def test_an_applied_change_is_a_new_version_with_its_fact() -> None:
    state, effects = ab.decide({}, [incoming("d1", 7, {"power_w": 5.0})], NOW)

    after = state["d1"]
    assert (after.version, after.last_seq, after.attributes) == (1, 7, {"power_w": 5.0})
    assert after.connection == "online" and after.last_seen == T0 + timedelta(milliseconds=7)
    assert effects.written == {"d1": after}
    # Its first reading also brought it online: the same fact as a transition (audited).
    [(subject, body, msg_id), transition] = effects.facts
    assert (subject, msg_id) == (subjects.device_state("d1"), "state:d1:1")
    assert transition == (subjects.device_transition("d1"), body, "transition:d1:1")
    fact = msgspec.json.decode(body, type=m.DeviceStateFact)
    assert (fact.version, fact.cause_event_id, fact.time) == (1, "e-d1-7", NOW)
    assert effects.outcomes == {ab.Outcome.APPLIED: 1}


def test_the_input_state_is_left_as_it_was() -> None:
    before = {"d1": m.DeviceSnapshot(device_id="d1", version=3, last_seq=2)}
    kept = dict(before)
    ab.decide(before, [incoming("d1", 3, {"n": 1})], NOW)
    assert before == kept


def test_an_event_that_changes_nothing_moves_last_seq_only_and_says_nothing() -> None:
    first, _ = ab.decide({}, [incoming("d1", 1, {"n": 1})], NOW)
    second, effects = ab.decide(first, [incoming("d1", 2, {"n": 1})], NOW)
    assert (second["d1"].version, second["d1"].last_seq) == (1, 2)
    assert effects.written == {"d1": second["d1"]} and effects.facts == []


def test_events_of_one_device_are_applied_in_stream_order() -> None:
    batch = [incoming("d1", 5, {"n": 5}), incoming("d1", 4, {"n": 4})]
    state, effects = ab.decide({}, batch, NOW)
    assert state["d1"].attributes == {"n": 5} and state["d1"].last_seq == 5
    assert fact_ids(effects) == ["state:d1:1", "transition:d1:1", "state:d1:2"]


def test_an_event_applied_before_a_crash_is_not_applied_again_but_its_fact_is_resent() -> None:
    applied, first = ab.decide({}, [incoming("d1", 1, {"n": 1}), incoming("d1", 2, {"n": 2})], NOW)
    again, effects = ab.decide(
        applied, [incoming("d1", 1, {"n": 1}), incoming("d1", 2, {"n": 2})], NOW
    )
    assert again == applied and effects.written == {}
    # Only the latest: the one whose fact a crash before the ack may have kept off the bus.
    assert fact_ids(effects) == ["state:d1:2"] == fact_ids(first)[-1:]
    assert effects.outcomes == {ab.Outcome.DUPLICATE: 2}


def test_a_duplicate_of_a_device_that_never_changed_sends_nothing() -> None:
    state = {"d1": m.DeviceSnapshot(device_id="d1", version=0, last_seq=4)}
    _, effects = ab.decide(state, [incoming("d1", 4, {})], NOW)
    assert effects.facts == []


def test_events_of_a_device_that_may_not_report_are_refused_with_the_reason() -> None:
    cases = {
        None: "device is not registered",
        ab.Standing.PENDING: "device is waiting for an administrator to approve it",
        ab.Standing.REJECTED: "device was rejected by an administrator",
        ab.Standing.DISCONNECTED: "device is disconnected by an administrator",
    }
    for standing, reason in cases.items():
        state, effects = ab.decide({}, [incoming("d1", 9, {"n": 1}, standing=standing)], NOW)
        assert effects.written == {} and "d1" not in state
        [(subject, body, msg_id)] = effects.facts
        assert (subject, msg_id) == (subjects.device_rejected("d1"), "rejected:9")
        assert m.rejected_fact_decoder.decode(body).reason == reason
        assert effects.outcomes == {ab.Outcome.REJECTED: 1}


def test_a_rule_may_still_mark_a_disconnected_device() -> None:
    mark = incoming(
        "d1",
        1,
        {"rule_id": "r1", "state": "triggered"},
        kind="mark",
        standing=ab.Standing.DISCONNECTED,
    )
    state, _ = ab.decide({}, [mark], NOW)
    assert state["d1"].state == "triggered"


def test_data_that_can_never_be_applied_is_a_dead_letter_and_the_batch_goes_on() -> None:
    batch = [incoming("d1", 1, {"power_w": [1, 2]}), incoming("d1", 2, {"power_w": 3.0})]
    state, effects = ab.decide({}, batch, NOW)
    assert list(effects.dead) == [1] and "$.data.power_w" in effects.dead[1]
    assert state["d1"].attributes == {"power_w": 3.0} and state["d1"].version == 1


def test_a_command_status_is_written_with_the_state() -> None:
    status = {"command_id": "c1", "status": "done"}
    _, effects = ab.decide({}, [incoming("d1", 1, status, kind="command_status")], NOW)
    assert effects.statuses == [("d1", m.CommandStatusData(command_id="c1", status="done"))]


def test_standing_of_a_registry_entry() -> None:
    assert ab.standing("active", True) == ab.Standing.ACTIVE
    assert ab.standing("active", False) == ab.Standing.DISCONNECTED
    assert ab.standing("pending", True) == ab.Standing.PENDING
    assert ab.standing("rejected", True) == ab.Standing.REJECTED
    assert ab.standing("decommissioned", True) is None


# --- properties ---------------------------------------------------------------------------------

DEVICES = ["a", "b", "c"]
STANDINGS = st.sampled_from([ACTIVE, ACTIVE, ab.Standing.DISCONNECTED, ab.Standing.PENDING, None])


@st.composite
def worlds(draw: st.DrawFn) -> tuple[dict[str, m.DeviceSnapshot], list[ab.Incoming]]:
    """A state some batches left, and the next batch: fresh sequences above every device's
    `last_seq`, each event a telemetry that changes its device (its value is its sequence)
    or, now and then, data that can never be applied."""
    start = draw(st.integers(0, 50))
    state = {
        d: m.DeviceSnapshot(device_id=d, version=draw(st.integers(0, 5)), last_seq=start)
        for d in draw(st.sets(st.sampled_from(DEVICES)))
    }
    standings = {d: draw(STANDINGS) for d in DEVICES}
    batch = []
    for offset, (device, bad) in enumerate(
        draw(st.lists(st.tuples(st.sampled_from(DEVICES), st.booleans()), max_size=30))
    ):
        seq = start + 1 + offset
        data: dict[str, Any] = {"n": [seq]} if bad and offset % 3 == 0 else {"n": seq}
        batch.append(incoming(device, seq, data, standing=standings[device]))
    order = draw(st.permutations(batch))
    return state, list(order)


@settings(max_examples=200, deadline=None)
@given(worlds())
def test_a_replayed_batch_changes_nothing(
    world: tuple[dict[str, m.DeviceSnapshot], list[ab.Incoming]],
) -> None:
    state, batch = world
    once, first = ab.decide(state, batch, NOW)
    twice, again = ab.decide(once, batch, NOW)

    assert twice == once
    assert again.written == {} and again.statuses == []
    # What it sends again is only what the stream drops as a duplicate: the same ids.
    resent_latest = {f"state:{d}:{s.version}" for d, s in once.items()}
    assert set(fact_ids(again)) <= set(fact_ids(first)) | resent_latest
    assert again.dead.items() <= first.dead.items()  # dead-lettered again under the same id


@settings(max_examples=200, deadline=None)
@given(worlds())
def test_a_devices_version_moves_by_the_number_of_events_applied_to_it(
    world: tuple[dict[str, m.DeviceSnapshot], list[ab.Incoming]],
) -> None:
    state, batch = world
    after, effects = ab.decide(state, batch, NOW)
    for device in DEVICES:
        applied = [
            i
            for i in batch
            if i.event.subject == device
            and i.seq not in effects.dead
            and ab.refusal(i.event.type, i.standing) is None
        ]
        before = state[device].version if device in state else 0
        now = after[device].version if device in after else 0
        assert now - before == len(applied)
    assert sum(effects.outcomes.values()) == len(batch)


@settings(max_examples=200, deadline=None)
@given(worlds())
def test_refused_events_never_change_state(
    world: tuple[dict[str, m.DeviceSnapshot], list[ab.Incoming]],
) -> None:
    state, batch = world
    refused = {i.event.subject for i in batch if ab.refusal(i.event.type, i.standing)}
    after, effects = ab.decide(state, batch, NOW)
    for device in refused:  # a device's standing is one for the whole batch
        assert after.get(device) == state.get(device)
        assert device not in effects.written
