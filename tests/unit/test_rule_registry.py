"""The registry as the rules keep it: a registry fact costs one entry, its typed entry decodes
what was ever on the wire, and a state fact reaches only the rules that may read it."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from libs import messages as m
from libs import rule_logic as rl
from services.rules.loading import RuleBook, apply_registry_fact

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
    assert book.watching("meter", "energy_meter") == [named, tagged]
    assert book.watching("lamp", "light") == [tagged, lights]
    assert book.watching("unknown", None) == [tagged]
    assert RuleBook({"named": named}).watching("lamp", "light") == []
