"""The registry as the rules keep it: a registry fact costs one entry, its typed entry decodes
what was ever on the wire, and a state fact reaches only the rules that may read it."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from libs import messages as m
from libs import rule_logic as rl
from services.rules.loading import MOST_FILTERED_DEVICES, RuleBook, apply_registry_fact

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


def registry_fact(change: str, **entry: object) -> m.RegistryFact:
    device = {"id": "lamp", "kind": "light", "lifecycle": "active", "enabled": True} | entry
    raw = {
        "device_id": "lamp",
        "change": change,
        "actor": "user:alice",
        "correlation_id": "c",
        "time": T0.isoformat(),
        "device": None if change == "deleted" else device,
    }
    return m.registry_fact_decoder.decode(msgspec.json.encode(raw))


def test_a_fact_as_the_gateway_has_always_written_it_decodes_to_a_typed_entry() -> None:
    fact = registry_fact(
        "created",
        name="Lamp",
        location="home-a/hall",
        metadata={"tags": ["porch"]},
        created_at=T0.isoformat(),
        updated_at=T0.isoformat(),
    )
    assert fact.change is m.RegistryChange.CREATED
    assert fact.device is not None
    assert (fact.device.lifecycle, fact.device.tags) == (m.Lifecycle.ACTIVE, ("porch",))
    # And it goes back on the wire as it came.
    again = m.registry_fact_decoder.decode(m.encode(fact))
    assert again == fact


def test_a_registry_change_is_applied_to_its_entry_alone() -> None:
    registry = {"other": rl.DeviceInfo("sensor", None)}
    apply_registry_fact(registry, registry_fact("created", location="home-a/hall"))
    assert registry["lamp"] == rl.DeviceInfo("light", "home-a/hall")
    apply_registry_fact(registry, registry_fact("updated", lifecycle="pending"))
    assert registry["lamp"].lifecycle is m.Lifecycle.PENDING
    apply_registry_fact(registry, registry_fact("deleted"))
    assert registry == {"other": rl.DeviceInfo("sensor", None)}


def test_a_pending_or_disconnected_device_is_not_commanded() -> None:
    registry = {
        "lamp": rl.DeviceInfo("light", None, lifecycle=m.Lifecycle.PENDING),
        "fan": rl.DeviceInfo("fan", None, enabled=False),
        "tv": rl.DeviceInfo("tv", None),
    }
    assert rl.refusal("lamp", registry) == "device lamp is pending, not active"
    assert rl.refusal("fan", registry) == "device fan is disconnected"
    assert rl.refusal("gone", registry) == "device gone is not registered"
    assert rl.refusal("tv", registry) is None


def rule(rule_id: str, trigger: m.Trigger) -> m.Rule:
    action = m.CommandAction(device_id="lamp", action="turn_off")
    return m.Rule(
        id=rule_id, name=rule_id, trigger=trigger, actions=[action], enabled=True, version=1
    )


def test_a_state_fact_reaches_only_the_rules_that_may_read_its_device() -> None:
    named = rule("named", m.ThresholdTrigger(device_id="meter", attribute="power_w", above=1))
    lights = rule(
        "lights",
        m.ThresholdTrigger(selector=m.Selector(kind="light"), attribute="power_w", above=1),
    )
    tagged = rule(
        "tagged",
        m.ThresholdTrigger(selector=m.Selector(tag="porch"), attribute="power_w", above=1),
    )
    book = RuleBook({r.id: r for r in (named, lights, tagged)})
    meter = rl.DeviceInfo("energy_meter", "home/hall", ("porch",))
    assert book.watching("meter", meter) == [named, tagged]
    assert book.watching("lamp", rl.DeviceInfo("light", None, ("porch",))) == [lights, tagged]
    assert book.watching("lamp", rl.DeviceInfo("light", None)) == [lights]
    assert book.watching("unknown", None) == []
    assert RuleBook({"named": named}).watching("lamp", rl.DeviceInfo("light", None)) == []


def test_a_fact_no_rule_reads_is_told_by_its_device_alone() -> None:
    named = rule("named", m.ThresholdTrigger(device_id="meter", attribute="power_w", above=1))
    upstairs = rule(
        "upstairs",
        m.ThresholdTrigger(
            selector=m.Selector(location="home/up/"), attribute="temperature_c", above=30
        ),
    )
    guarded = m.Rule(
        id="guarded",
        name="guarded",
        trigger=m.EventTrigger(subject="events.door.*"),
        conditions=[m.Not(condition=m.StateCondition(device_id="alarm", state="active"))],
        actions=[m.CommandAction(device_id="lamp", action="turn_on")],
        enabled=True,
        version=1,
    )
    book = RuleBook({r.id: r for r in (named, upstairs, guarded)})
    assert book.reads("meter", None)
    assert book.reads("alarm", None)  # a condition reads its state
    assert book.reads("t1", rl.DeviceInfo("thermometer", "home/up/bath"))
    assert book.watching("t1", rl.DeviceInfo("thermometer", "home/up")) == [upstairs]
    assert not book.reads("t2", rl.DeviceInfo("thermometer", "home/upper"))
    assert not book.reads("t3", rl.DeviceInfo("thermometer", "home/down/up"))
    assert not book.reads("t4", None)
    assert book.condition_devices == {"alarm"}


def test_the_rules_read_the_facts_of_the_devices_they_name_or_all_for_a_selector() -> None:
    named = rule("named", m.ThresholdTrigger(device_id="meter", attribute="power_w", above=1))
    guarded = m.Rule(
        id="guarded",
        name="guarded",
        trigger=m.ScheduleTrigger(cron="0 7 * * *"),
        conditions=[m.StateCondition(device_id="alarm", state="active")],
        actions=[m.CommandAction(device_id="lamp", action="turn_on")],
        enabled=True,
        version=1,
    )
    lights = rule(
        "lights",
        m.ThresholdTrigger(selector=m.Selector(kind="light"), attribute="power_w", above=1),
    )
    assert RuleBook({}).fact_subjects == []
    assert RuleBook({"named": named}).fact_subjects == ["system.device.meter.state"]
    assert RuleBook({"named": named, "guarded": guarded}).fact_subjects == [
        "system.device.alarm.state",
        "system.device.meter.state",
    ]
    assert RuleBook({"named": named, "lights": lights}).fact_subjects == ["system.device.*.state"]
    many = {
        f"r{n}": rule(f"r{n}", m.ThresholdTrigger(device_id=f"m{n}", attribute="w", above=1))
        for n in range(MOST_FILTERED_DEVICES + 1)
    }
    assert RuleBook(many).fact_subjects == ["system.device.*.state"]
    many.popitem()
    assert len(RuleBook(many).fact_subjects) == MOST_FILTERED_DEVICES


names = st.sampled_from(["a", "b", "c"])
paths = st.lists(st.sampled_from(["a", "b", "", "a/b"]), max_size=3).map("/".join)
selectors = (
    st.tuples(
        st.none() | names, st.none() | paths | paths.map(lambda p: p + "/"), st.none() | names
    )
    .filter(lambda t: t != (None, None, None))
    .map(lambda t: m.Selector(*t))
)
infos = st.none() | st.builds(
    rl.DeviceInfo, names, st.none() | paths, st.lists(names, max_size=3).map(tuple)
)


@given(chosen=st.lists(selectors, max_size=6), info=infos)
def test_the_index_finds_every_rule_a_selector_picks_once(
    chosen: list[m.Selector], info: rl.DeviceInfo | None
) -> None:
    rules = [
        rule(f"r{i}", m.ThresholdTrigger(selector=sel, attribute="x", above=1))
        for i, sel in enumerate(chosen)
    ]
    book = RuleBook({r.id: r for r in rules})
    found = book.watching("d", info)
    picked = [
        r
        for r in rules
        if isinstance(r.trigger, m.ThresholdTrigger) and rl.selects(r.trigger, "d", info)
    ]
    assert len(found) == len({r.id for r in found})
    assert {r.id for r in picked} <= {r.id for r in found}
    assert book.reads("d", info) or not picked
