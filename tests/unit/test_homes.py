"""Homes without I/O: which home a message is about, what a homed rule may touch, and the
home the recorder files an audit row under."""

from __future__ import annotations

import pytest

from libs import homes, subjects
from libs import messages as m
from libs import rule_logic as rl
from services.recorder.rows import Rows, from_system


def registry_fact(device_id: str, change: str, location: str | None) -> bytes:
    device = None if location == "-" else {"id": device_id, "location": location}
    fact = m.RegistryFact(
        device_id=device_id,
        change=change,  # type: ignore[arg-type]
        actor="user:alice",
        correlation_id="c",
        time=m.now(),
        device=device,
    )
    return m.encode(fact)


def change_fact(what: str, object_id: str, home: str | None) -> bytes:
    fact = m.ChangeFact(
        what=what,  # type: ignore[arg-type]
        id=object_id,
        change="created",
        actor="user:alice",
        correlation_id="c",
        time=m.now(),
        home=home,
    )
    return m.encode(fact)


@pytest.mark.parametrize(
    ("subject", "about"),
    [
        ("events.lamp.telemetry", ("device", "lamp")),
        ("commands.lamp", ("device", "lamp")),
        ("system.device.lamp.state", ("device", "lamp")),
        ("system.device.lamp.registry", ("device", "lamp")),
        ("system.rule.r1.fired", ("rule", "r1")),
        ("system.rule.r1.changed", ("rule", "r1")),
        ("system.alert.r1", ("rule", "r1")),
        ("system.notify.s1", ("subscription", "s1")),
        ("system.subscription.s1.changed", ("subscription", "s1")),
        ("system.location.kitchen", ("location", "kitchen")),
        ("deadletter.events.lamp.telemetry", None),
        ("system.user.u1.changed", None),
        ("system.apikey.k1.changed", None),
        ("events.lamp", None),
        ("system.device.lamp", None),
        ("system", None),
    ],
)
def test_a_subject_names_the_object_it_is_about(subject: str, about: object) -> None:
    assert homes.about(subject) == about


def test_the_index_follows_the_facts_that_move_objects_between_homes() -> None:
    index = homes.HomeIndex()
    reg = subjects.device_registry("lamp")

    index.learn(reg, registry_fact("lamp", "created", "home-a/kitchen"))
    first = index.home("events.lamp.telemetry")
    index.learn(reg, registry_fact("lamp", "updated", "home-b/hall"))
    moved = index.home("commands.lamp")
    index.learn(reg, registry_fact("lamp", "deleted", "-"))  # its home kept until a reload
    index.learn(subjects.rule_changed("r1"), change_fact("rule", "r1", "home-a"))
    index.learn(subjects.location_changed("hall"), change_fact("location", "hall", "home-b"))
    index.learn(subjects.rule_fired("r1"), b"not a fact")  # nothing to learn, nothing broken
    index.learn(reg, b"{broken")

    assert (first, moved, index.home("system.device.lamp.state")) == ("home-a", "home-b", "home-b")
    assert index.home("system.alert.r1") == "home-a"
    assert index.home("system.location.hall") == "home-b"
    assert index.home("events.stranger.telemetry") is None
    assert not index.knows("events.stranger.telemetry")
    assert index.knows("deadletter.events.stranger.x")  # no object's: nothing to look up


def test_an_audience_sees_its_homes_and_nothing_of_no_home() -> None:
    index = homes.HomeIndex()
    index.set(homes.DEVICE, "lamp-a", "home-a")
    index.set(homes.DEVICE, "lamp-b", "home-b")
    index.set(homes.DEVICE, "pending", None)
    resident = homes.Audience(index, frozenset({"home-a"}))

    seen = [
        s
        for s in (
            "events.lamp-a.telemetry",
            "events.lamp-b.telemetry",
            "events.pending.hello",
            "events.unknown.telemetry",
            "deadletter.events.lamp-a.telemetry",
        )
        if resident.may_see(s)
    ]

    # The one the index has not heard of is kept for `sees_message` to ask about.
    assert seen == ["events.lamp-a.telemetry", "events.unknown.telemetry"]


async def seen_by(*audiences: homes.Audience, subject: str, data: bytes) -> tuple[bool, ...]:
    return tuple([await audience.sees_message(subject, data) for audience in audiences])


async def test_a_fact_that_places_its_object_belongs_to_the_home_it_states() -> None:
    index = homes.HomeIndex()  # not told of the moves yet: lamp and r1 in home A
    index.set(homes.DEVICE, "lamp", "home-a")
    index.set(homes.RULE, "r1", "home-a")
    in_a = homes.Audience(index, frozenset({"home-a"}))
    in_b = homes.Audience(index, frozenset({"home-b"}))
    reg, rule = subjects.device_registry("lamp"), subjects.rule_changed("r1")
    lamp_moved = registry_fact("lamp", "updated", "home-b/hall")
    rule_moved = change_fact("rule", "r1", "home-b")

    assert index.classify(reg) is homes.UNKNOWN and index.classify(rule) is homes.UNKNOWN
    assert index.classify("events.lamp.telemetry") == "home-a"  # no body read
    index.set(homes.RULE, "changed", "home-a")
    assert index.classify("system.alert.changed") == "home-a"  # its alert places nothing
    assert index.home_at_once(reg, lamp_moved) == "home-b"
    assert await seen_by(in_a, in_b, subject=reg, data=lamp_moved) == (False, True)
    assert await seen_by(in_a, in_b, subject=rule, data=rule_moved) == (False, True)
    assert await in_a.sees_message(subjects.rule_fired("r1"), rule_moved)  # places nothing
    # One that cannot be read, or a deletion naming no place: the index's home.
    assert index.home_at_once(reg, b"{broken") == "home-a"
    assert index.home_at_once(reg, registry_fact("lamp", "deleted", "-")) == "home-a"


# --- rules ----------------------------------------------------------------------------------


REGISTRY = {
    "lamp-a": rl.DeviceInfo("light", "home-a/kitchen"),
    "lamp-b": rl.DeviceInfo("light", "home-b/hall"),
    "off-a": rl.DeviceInfo("light", "home-a/hall", enabled=False),
}
LIGHTS = m.ThresholdTrigger(attribute="power_w", above=1.0, selector=m.Selector(kind="light"))


def test_a_homed_rule_selects_and_sends_to_its_homes_devices_only() -> None:
    watched = [d for d, info in REGISTRY.items() if rl.selects(LIGHTS, d, info, "home-a")]
    anywhere = [d for d, info in REGISTRY.items() if rl.selects(LIGHTS, d, info)]

    assert watched == ["lamp-a", "off-a"]
    assert anywhere == ["lamp-a", "lamp-b", "off-a"]
    assert rl.refusal("lamp-a", REGISTRY, "home-a") is None
    assert (
        rl.refusal("lamp-b", REGISTRY, "home-a") == "device lamp-b is not registered in home home-a"
    )
    assert rl.refusal("ghost", REGISTRY) == "device ghost is not registered"
    assert rl.refusal("off-a", REGISTRY, "home-a") == "device off-a is disconnected"


def test_a_homed_rules_conditions_see_nothing_beyond_its_home() -> None:
    views = {d: rl.DeviceView("active", "online", {"power_w": 5.0}) for d in ("lamp-a", "lamp-b")}
    other_home = m.AttributeCondition(device_id="lamp-b", attribute="power_w", above=1.0)
    own_home = m.AttributeCondition(device_id="lamp-a", attribute="power_w", above=1.0)

    seen = rl.home_views(views, REGISTRY, "home-a")

    assert list(seen) == ["lamp-a"] and "lamp-b" not in seen
    assert rl.check(own_home, seen, m.now())[0] is True
    assert rl.check(other_home, seen, m.now())[0] is False
    assert rl.home_views(views, REGISTRY, None) is views


# --- the audit log's home -----------------------------------------------------------------


def test_the_recorder_files_rows_under_the_home_they_are_about() -> None:
    rows = Rows()
    fired = m.RuleFired(
        rule_id="r1",
        episode_id="e1",
        kind="fired",
        device_id="",
        reason="cron",
        values={},
        outcomes=[],
        trigger_event_id=None,
        correlation_id="c",
        time=m.now(),
        home="home-a",
    )
    alert = m.make_event("r1", "alert", {"rule_id": "r1", "message": "hi", "home": "home-a"})
    facts = [
        (subjects.device_registry("lamp"), registry_fact("lamp", "created", "home-b/hall")),
        (subjects.rule_changed("r1"), change_fact("rule", "r1", "home-a")),
        (subjects.location_changed("hall"), change_fact("location", "hall", "home-b")),
        (subjects.rule_fired("r1"), m.encode(fired)),
        (subjects.alert("r1"), m.encode(alert)),
        (subjects.rule_changed("r2"), change_fact("rule", "r2", None)),
    ]

    for seq, (subject, data) in enumerate(facts, start=1):
        from_system(rows, subject, data, ("SYSTEM", seq))

    assert [(a["action"], a["home"]) for a in rows.audit] == [
        ("device.created", "home-b"),
        ("rule.created", "home-a"),
        ("location.created", "home-b"),
        ("rule.fired", "home-a"),
        ("alert.raised", "home-a"),
        ("rule.created", None),
    ]
