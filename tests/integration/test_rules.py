"""The rules service as a process on a real bus and database: durable `for` timers,
once-per-episode firing, fail-over, and refusals recorded in the trace."""

from __future__ import annotations

import re
from datetime import timedelta

import msgspec
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from libs import bus, subjects
from libs import messages as m
from libs.db.models import Device, DeviceState, RuleRecord
from services.rules.partitions import Partition
from tests.helpers import eventually, unique_id
from tests.processes import Service
from tests.proxy import Relay


async def add_rule(sessions, nc, spec: m.RuleSpec, rule_id: str | None = None) -> str:  # type: ignore[no-untyped-def]
    rule_id = rule_id or unique_id("rule")
    async with sessions.begin() as session:
        session.add(
            RuleRecord(id=rule_id, name=spec.name, spec=msgspec.to_builtins(spec), enabled=True)
        )
    await nc.publish(subjects.rule_changed(rule_id), b"")
    return rule_id


async def add_devices(  # type: ignore[no-untyped-def]
    sessions, *ids: str, enabled: bool = True, lifecycle: str = "active"
) -> None:
    async with sessions.begin() as session:
        for device_id in ids:
            session.add(
                Device(
                    id=device_id, name=device_id, kind="light", enabled=enabled, lifecycle=lifecycle
                )
            )


async def report(js, device_id: str, power: float, version: int) -> None:  # type: ignore[no-untyped-def]
    """What the actors publish when a device's power changes."""
    fact = m.DeviceStateFact(
        device_id=device_id,
        version=version,
        state="active" if power else "off",
        connection="online",
        attributes={"power_w": power},
        last_seen=m.now(),
        changed=["attributes"],
        previous_state=None,
        cause_event_id=m.new_id(),
        cause_type="telemetry",
        correlation_id=None,
        time=m.now(),
    )
    await bus.publish(js, subjects.device_state(device_id), fact)


async def collected(js, subject: str, decoder, settle: float = 0.0) -> list:  # type: ignore[no-untyped-def]
    """Every message stored on `subject` so far (the stream is the witness)."""
    stream = subjects.stream_of(subject)
    stored = subjects.stored_filter(subject)  # an event's subject gains its partition
    info = await js.stream_info(stream, subjects_filter=stored)
    count = sum((info.state.subjects or {}).values())
    if count == 0:
        return []
    sub = await js.subscribe(
        stored,
        stream=stream,
        ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
    )
    out = [decoder.decode((await sub.next_msg(timeout=5)).data) for _ in range(count)]
    await sub.unsubscribe()
    return out


def rule_spec(meter: str, light: str, for_s: float) -> m.RuleSpec:
    return m.RuleSpec(
        name="light on too long",
        trigger=m.ThresholdTrigger(device_id=meter, attribute="power_w", above=1.0, for_=for_s),
        actions=[
            m.CommandAction(device_id=light, action="turn_off"),
            m.SetStateAction(device_id=meter),
        ],
    )


async def test_for_timer_survives_kill9_and_fires_once_at_its_deadline(
    service_env, data_dir, nc, js, sessions
) -> None:  # type: ignore[no-untyped-def]
    meter, light = unique_id("meter"), unique_id("light")
    await add_devices(sessions, meter, light)
    rule_id = await add_rule(sessions, nc, rule_spec(meter, light, for_s=4.0))
    rules = Service("services.rules", service_env, data_dir).start()
    try:
        await eventually(lambda: _reads_facts_of(js, meter), timeout=10)
        started = m.now()
        await report(js, meter, 60.0, 1)
        await eventually(lambda: _has_episode(js, rule_id, meter), timeout=10)
        rules.kill9()
        assert await collected(js, subjects.rule_fired(rule_id), m.rule_fired_decoder) == []
        rules.start()
        fired = await eventually(
            lambda: collected(js, subjects.rule_fired(rule_id), m.rule_fired_decoder), timeout=30
        )
        commands = await collected(js, subjects.commands(light), m.command_decoder)
    finally:
        code = rules.stop()
    assert code == 0, rules.tail()
    assert [f.kind for f in fired] == ["fired"]
    assert fired[0].time >= started + timedelta(seconds=4)
    assert [c.action for c in commands] == ["turn_off"]
    assert commands[0].correlation_id == fired[0].correlation_id == fired[0].episode_id
    assert all(o.ok for o in fired[0].outcomes)


async def test_episode_ends_and_clears_the_mark(service_env, data_dir, nc, js, sessions) -> None:  # type: ignore[no-untyped-def]
    meter, light = unique_id("meter"), unique_id("light")
    await add_devices(sessions, meter, light)
    rule_id = await add_rule(sessions, nc, rule_spec(meter, light, for_s=0))
    rules = Service("services.rules", service_env, data_dir).start()
    try:
        await eventually(lambda: _reads_facts_of(js, meter), timeout=10)
        for version, power in enumerate([60.0, 61.0, 62.0], start=1):
            await report(js, meter, power, version)
        await report(js, meter, 0.0, 4)
        runs = await eventually(lambda: _kinds(js, rule_id, want=["fired", "cleared"]), timeout=15)
        marks = await collected(js, subjects.device_events(meter, "mark"), m.cloud_event_decoder)
    finally:
        rules.stop()
    assert [r.kind for r in runs] == ["fired", "cleared"]
    assert [e.data["state"] for e in marks] == ["triggered", None]


async def test_a_rule_switched_off_and_on_again_fires_on_its_next_trigger(
    service_env, data_dir, nc, js, sessions
) -> None:  # type: ignore[no-untyped-def]
    """Switched off after it fired, the rule misses the reading that ends its episode; on
    again, it starts afresh (the episode cleared, saying why) and the next trigger fires."""
    meter, light = unique_id("meter"), unique_id("light")
    await add_devices(sessions, meter, light)
    rule_id = await add_rule(sessions, nc, rule_spec(meter, light, for_s=0))
    rules = Service("services.rules", service_env, data_dir).start()
    try:
        await eventually(lambda: _reads_facts_of(js, meter), timeout=10)
        await report(js, meter, 60.0, 1)
        await eventually(lambda: _kinds(js, rule_id, want=["fired"]), timeout=15)
        await _switch(sessions, nc, rule_id, enabled=False)
        await eventually(lambda: _kinds(js, rule_id, want=["fired", "cleared"]), timeout=15)
        await report(js, meter, 0.0, 2)  # while it is off
        await _switch(sessions, nc, rule_id, enabled=True)
        await eventually(lambda: _reads_facts_of(js, meter), timeout=10)
        await report(js, meter, 60.0, 3)
        again = ["fired", "cleared", "fired"]
        runs = await eventually(lambda: _kinds(js, rule_id, want=again), timeout=15)
    finally:
        rules.stop()
    assert runs[1].reason == "the rule was disabled"
    commands = await collected(js, subjects.commands(light), m.command_decoder)
    assert [c.action for c in commands] == ["turn_off", "turn_off"]


async def _switch(sessions, nc, rule_id: str, enabled: bool) -> None:  # type: ignore[no-untyped-def]
    """What the gateway does: the rule switched, its version moved on, the change signalled."""
    async with sessions.begin() as session:
        record = await session.get(RuleRecord, rule_id)
        record.enabled = enabled
        record.version += 1
    await nc.publish(subjects.rule_changed(rule_id), b"")


async def _kinds(js, rule_id: str, want: list[str]):  # type: ignore[no-untyped-def]
    runs = await collected(js, subjects.rule_fired(rule_id), m.rule_fired_decoder)
    return runs if [r.kind for r in runs] == want else None


@pytest.mark.parametrize(
    ("registry", "detail"),
    [
        ({"enabled": False}, "device {light} is disconnected"),
        ({"lifecycle": "pending"}, "device {light} is pending, not active"),  # not approved yet
    ],
)
async def test_a_target_that_may_not_be_commanded_is_reported_and_not_commanded(
    service_env, data_dir, nc, js, sessions, registry: dict, detail: str
) -> None:  # type: ignore[no-untyped-def]
    meter, light = unique_id("meter"), unique_id("light")
    await add_devices(sessions, meter)
    await add_devices(sessions, light, **registry)
    rule_id = await add_rule(sessions, nc, rule_spec(meter, light, for_s=0))
    rules = Service("services.rules", service_env, data_dir).start()
    try:
        await eventually(lambda: _reads_facts_of(js, meter), timeout=10)
        await report(js, meter, 60.0, 1)
        fired = await eventually(
            lambda: collected(js, subjects.rule_fired(rule_id), m.rule_fired_decoder), timeout=15
        )
    finally:
        rules.stop()
    command_outcome = fired[0].outcomes[0]
    assert not command_outcome.ok
    assert command_outcome.detail == detail.format(light=light)
    assert await collected(js, subjects.commands(light), m.command_decoder) == []


async def test_standby_rules_process_takes_over_pending_timer(
    service_env, data_dir, nc, js, sessions
) -> None:  # type: ignore[no-untyped-def]
    meter, light = unique_id("meter"), unique_id("light")
    await add_devices(sessions, meter, light)
    rule_id = await add_rule(sessions, nc, rule_spec(meter, light, for_s=3.0))
    owner = Service("services.rules", service_env, data_dir).start()
    standby = Service("services.rules", service_env, data_dir)
    try:
        await eventually(lambda: _reads_facts_of(js, meter), timeout=10)
        standby.start()
        await eventually(lambda: "standing by" in standby.tail(), timeout=10)
        await report(js, meter, 60.0, 1)
        await eventually(lambda: _has_episode(js, rule_id, meter), timeout=10)
        owner.kill9()
        fired = await eventually(
            lambda: collected(js, subjects.rule_fired(rule_id), m.rule_fired_decoder), timeout=30
        )
        assert "acquired" in standby.tail()
    finally:
        standby.stop()
        owner.stop()  # a failure before its kill -9 must not leave it running
    assert [f.kind for f in fired] == ["fired"]
    assert len(await collected(js, subjects.commands(light), m.command_decoder)) == 1


async def _has_episode(js, rule_id: str, device_id: str) -> bool:  # type: ignore[no-untyped-def]
    kv = await js.key_value("rule_episodes")
    try:
        return bool((await kv.get(f"{rule_id}.{device_id}")).value)
    except Exception:
        return False


async def press(js, device_id: str, kind: str = "long") -> m.CloudEvent:  # type: ignore[no-untyped-def]
    event = m.make_event(device_id, "button", {"press": kind})
    await bus.publish(js, event.nats_subject, event, msg_id=event.id)
    return event


async def test_delay_between_actions_survives_kill9(
    service_env, data_dir, nc, js, sessions
) -> None:  # type: ignore[no-untyped-def]
    button, light = unique_id("button"), unique_id("light")
    await add_devices(sessions, button, light)
    spec = m.RuleSpec(
        name="long press: light on for a while",
        trigger=m.EventTrigger(subject=f"events.{button}.button", match={"press": "long"}),
        actions=[
            m.CommandAction(device_id=light, action="turn_on"),
            m.DelayAction(for_="4s"),
            m.CommandAction(device_id=light, action="turn_off"),
        ],
    )
    rule_id = await add_rule(sessions, nc, spec)
    rules = Service("services.rules", service_env, data_dir).start()
    try:
        await eventually(lambda: _reads_events_of(js, button), timeout=10)
        await press(js, button, "short")  # does not match
        await press(js, button)
        first = await eventually(
            lambda: collected(js, subjects.commands(light), m.command_decoder), timeout=15
        )
        assert [c.action for c in first] == ["turn_on"]
        rules.kill9()
        rules.start()
        both = await eventually(
            lambda: _n(collected(js, subjects.commands(light), m.command_decoder), 2), timeout=30
        )
        # The trace follows the run's commands: wait for it too.
        runs = await eventually(
            lambda: _n(collected(js, subjects.rule_fired(rule_id), m.rule_fired_decoder), 2),
            timeout=10,
        )
    finally:
        rules.stop()
    assert [c.action for c in both] == ["turn_on", "turn_off"]
    assert both[1].issued_at - both[0].issued_at >= timedelta(seconds=4)
    assert [r.kind for r in runs] == ["fired", "continued"]


async def test_conditions_that_fail_skip_the_actions_and_say_why(
    service_env, data_dir, nc, js, sessions
) -> None:  # type: ignore[no-untyped-def]
    button, light = unique_id("button"), unique_id("light")
    await add_devices(sessions, button, light)
    spec = m.RuleSpec(
        name="only when the light is online",
        trigger=m.EventTrigger(subject=f"events.{button}.button"),
        conditions=[m.StateCondition(device_id=light, connection="online")],
        actions=[m.CommandAction(device_id=light, action="turn_on")],
    )
    rule_id = await add_rule(sessions, nc, spec)
    rules = Service("services.rules", service_env, data_dir).start()
    try:
        await eventually(lambda: _reads_events_of(js, button), timeout=10)
        await press(js, button)
        runs = await eventually(
            lambda: collected(js, subjects.rule_fired(rule_id), m.rule_fired_decoder), timeout=15
        )
    finally:
        rules.stop()
    assert [r.kind for r in runs] == ["skipped"]
    assert f"{light} is unknown" in runs[0].reason
    assert await collected(js, subjects.commands(light), m.command_decoder) == []


async def test_a_condition_added_later_reads_the_state_its_device_reported_before(
    service_env, data_dir, nc, js, sessions
) -> None:  # type: ignore[no-untyped-def]
    button, light = unique_id("button"), unique_id("light")
    await add_devices(sessions, button, light)
    rules = Service("services.rules", service_env, data_dir).start()
    try:
        await eventually(lambda: "acquired" in rules.tail(), timeout=10)
        # As the actors do: the state stored, then its fact, which no rule reads yet.
        async with sessions.begin() as session:
            session.add(DeviceState(device_id=light, state="off", connection="online"))
        await report(js, light, 0.0, 1)
        spec = m.RuleSpec(
            name="only when the light is online",
            trigger=m.EventTrigger(subject=f"events.{button}.button"),
            conditions=[m.StateCondition(device_id=light, connection="online")],
            actions=[m.CommandAction(device_id=light, action="turn_on")],
        )
        rule_id = await add_rule(sessions, nc, spec)
        await eventually(lambda: _reads_events_of(js, button), timeout=10)
        await press(js, button)
        runs = await eventually(
            lambda: collected(js, subjects.rule_fired(rule_id), m.rule_fired_decoder), timeout=15
        )
    finally:
        rules.stop()
    assert [r.kind for r in runs] == ["fired"], runs[0].reason


async def _n(found, n: int):  # type: ignore[no-untyped-def]
    items = await found
    assert len(items) >= n, f"{len(items)} of {n}: {items}"
    return items


async def _reads_facts_of(js, device_id: str) -> bool:  # type: ignore[no-untyped-def]
    """The rules' facts consumer takes this device's state facts, or all of them (made for
    the rules, deliver-new: facts before it are not the rules' business)."""
    filters = await _filters(js, subjects.SYSTEM_STREAM, bus.rules_facts_durable(0))
    return bool({subjects.device_state(device_id), subjects.DEVICE_STATES_ALL} & set(filters))


async def _reads_events_of(js, device_id: str) -> bool:  # type: ignore[no-untyped-def]
    """The rules' events consumer takes this device's events (made for the rule,
    deliver-new: events before it are not the rule's business)."""
    filters = await _filters(js, subjects.EVENTS_STREAM, bus.rules_events_durable(0))
    mine = subjects.stored_filter(f"events.{device_id}.>").removesuffix(">")  # events.~.*.<d>.
    return any(f.startswith(mine) or f == subjects.EVENTS_ALL for f in filters)


async def _filters(js, stream: str, durable: str) -> list[str]:  # type: ignore[no-untyped-def]
    try:
        config = (await js.consumer_info(stream, durable)).config
    except NotFoundError:
        return []
    return config.filter_subjects or [config.filter_subject or ">"]


def held_partitions(service: Service) -> set[int]:
    """The partitions a rules process holds now, from its log of acquired/released leases."""
    held: set[int] = set()
    log_text = service.log_path.read_text(errors="replace")
    for index, what in re.findall(r"lease rules-(\d+) (acquired|released|lost)", log_text):
        (held.add if what == "acquired" else held.discard)(int(index))
    return held


async def test_two_processes_share_the_partitions_and_one_takes_over_at_kill9(
    service_env, data_dir, nc, js, sessions
) -> None:  # type: ignore[no-untyped-def]
    count = 4
    env = {**service_env, "SMARTHOME_RULES_PARTITIONS": str(count)}
    # Two rules in each partition, each with a pending `for` timer when a process dies.
    pairs: dict[str, tuple[str, str]] = {}
    while len(pairs) < 2 * count:
        rule_id = unique_id("rule")
        if sum(_partition(r, count) == _partition(rule_id, count) for r in pairs) < 2:
            pairs[rule_id] = (unique_id("meter"), unique_id("light"))
    for rule_id, (meter, light) in pairs.items():
        await add_devices(sessions, meter, light)
        await add_rule(sessions, nc, rule_spec(meter, light, for_s=4.0), rule_id=rule_id)
    first = Service("services.rules", env, data_dir).start()
    second = Service("services.rules", env, data_dir).start()
    try:
        # Both evaluate: the first hands partitions over until each holds its share.
        await eventually(
            lambda: len(held_partitions(first)) == len(held_partitions(second)) == count // 2,
            timeout=30,
        )
        assert held_partitions(first).isdisjoint(held_partitions(second))
        for version, (meter, _light) in enumerate(pairs.values(), start=1):
            await report(js, meter, 60.0, version)
        for rule_id, (meter, _light) in pairs.items():
            await eventually(lambda r=rule_id, d=meter: _has_episode(js, r, d), timeout=10)
        first.kill9()
        await eventually(lambda: held_partitions(second) == set(range(count)), timeout=30)
        for rule_id in pairs:
            await eventually(
                lambda r=rule_id: collected(js, subjects.rule_fired(r), m.rule_fired_decoder),
                timeout=30,
            )
    finally:
        code = second.stop()
        first.stop()  # a failure before its kill -9 must not leave it running
    assert code == 0, second.tail()
    for rule_id, (_meter, light) in pairs.items():
        fired = await collected(js, subjects.rule_fired(rule_id), m.rule_fired_decoder)
        assert [f.kind for f in fired] == ["fired"], rule_id
        commands = await collected(js, subjects.commands(light), m.command_decoder)
        assert [c.action for c in commands] == ["turn_off"], rule_id


def _partition(rule_id: str, count: int) -> int:
    return next(i for i in range(count) if Partition(i, count).owns(rule_id))


@pytest.mark.parametrize(
    ("mode", "actions", "kinds"),
    [
        # The second press comes while the first run waits in its delay.
        ("single", ["turn_on", "turn_off"], ["fired", "skipped", "continued"]),
        ("queued", ["turn_on", "turn_off", "turn_on", "turn_off"], ["fired", "continued"] * 2),
        ("restart", ["turn_on", "turn_on", "turn_off"], ["fired", "fired", "continued"]),
    ],
)
async def test_a_trigger_during_a_run_follows_the_rules_mode(
    mode, actions, kinds, service_env, data_dir, nc, js, sessions
) -> None:  # type: ignore[no-untyped-def]
    button, light = unique_id("button"), unique_id("light")
    await add_devices(sessions, button, light)
    spec = m.RuleSpec(
        name=f"press: light on for a while ({mode})",
        trigger=m.EventTrigger(subject=f"events.{button}.button"),
        actions=[
            m.CommandAction(device_id=light, action="turn_on"),
            m.DelayAction(for_="2s"),
            m.CommandAction(device_id=light, action="turn_off"),
        ],
        mode=mode,
    )
    rule_id = await add_rule(sessions, nc, spec)
    rules = Service("services.rules", service_env, data_dir).start()
    try:
        await eventually(lambda: _reads_events_of(js, button), timeout=10)
        await press(js, button)
        await press(js, button)
        # The last trace is the last run's turn_off: every command before it has been sent.
        runs = await eventually(lambda: _kinds(js, rule_id, want=kinds), timeout=20)
        commands = await collected(js, subjects.commands(light), m.command_decoder)
    finally:
        rules.stop()
    assert [c.action for c in commands] == actions
    if mode == "single":
        assert "already running (mode single)" in runs[1].reason
    if mode != "single":  # two runs, each sending its own commands
        assert len({c.correlation_id for c in commands}) == 2


async def test_facts_a_dead_owner_fetched_and_did_not_ack_are_evaluated_before_newer_ones(
    service_env, data_dir, nc, js, sessions
) -> None:  # type: ignore[no-untyped-def]
    meter, light, other = unique_id("meter"), unique_id("light"), unique_id("meter")
    await add_devices(sessions, meter, light, other)
    rule_id = await add_rule(sessions, nc, rule_spec(meter, light, for_s=0))
    durable = bus.rules_facts_durable(0)
    await js.add_consumer(subjects.SYSTEM_STREAM, bus.rules_facts_consumer(0))
    await report(js, meter, 60.0, 1)  # the crossing
    # An owner fetches it and dies before its ack: the fact waits for its redelivery.
    dead = await js.pull_subscribe_bind(durable, stream=subjects.SYSTEM_STREAM)
    fetched: list = []
    while not any(msg.subject == subjects.device_state(meter) for msg in fetched):
        fetched += await dead.fetch(100, timeout=5)
    await dead.unsubscribe()
    await report(js, other, 5.0, 1)  # newer: its ack would ack the crossing too
    rules = Service("services.rules", service_env, data_dir).start()
    try:
        fired = await eventually(
            lambda: collected(js, subjects.rule_fired(rule_id), m.rule_fired_decoder), timeout=15
        )
        commands = await collected(js, subjects.commands(light), m.command_decoder)
    finally:
        rules.stop()
    assert [f.kind for f in fired] == ["fired"]
    assert [c.action for c in commands] == ["turn_off"]
    assert "facts left un-acked" in rules.tail(20_000)


async def test_facts_lost_with_a_connection_are_evaluated_once_in_order(
    service_env, data_dir, nats_url, nc, js, sessions
) -> None:  # type: ignore[no-untyped-def]
    """Facts the bus handed out on a connection that died before they arrived: the ack of a
    newer fact on the next connection would ack them unseen (AckPolicy.ALL)."""
    meter, light = unique_id("meter"), unique_id("light")
    await add_devices(sessions, meter, light)
    rule_id = await add_rule(sessions, nc, rule_spec(meter, light, for_s=0))
    relay = Relay(int(nats_url.rsplit(":", 1)[1]))
    rules = Service("services.rules", {**service_env, "NATS_URL": relay.url}, data_dir).start()
    version = 0

    async def crossings(n: int) -> int:
        nonlocal version
        for _ in range(n):
            for power in (60.0, 0.0):  # up (an episode starts and fires), down (it ends)
                version += 1
                await report(js, meter, power, version)
        return (await js.stream_info(subjects.SYSTEM_STREAM)).state.last_seq

    try:
        await eventually(lambda: _reads_facts_of(js, meter), timeout=10)
        await crossings(3)
        await eventually(lambda: _n(_runs(js, rule_id), 6), timeout=15)
        relay.drop()
        last = await crossings(3)
        await eventually(lambda: _handed_out(js, last), timeout=10)
        relay.cut()
        await crossings(3)
        runs = await eventually(lambda: _n(_runs(js, rule_id), 18), timeout=30)
        commands = await collected(js, subjects.commands(light), m.command_decoder)
    finally:
        rules.stop()
        relay.close()
    assert [r.kind for r in runs] == ["fired", "cleared"] * 9
    assert len(commands) == 9
    assert "never received" in rules.tail(20_000)


async def _runs(js, rule_id: str):  # type: ignore[no-untyped-def]
    return await collected(js, subjects.rule_fired(rule_id), m.rule_fired_decoder)


async def _handed_out(js, last_seq: int) -> bool:  # type: ignore[no-untyped-def]
    """The rules' consumer has delivered (into the relay that drops it) up to `last_seq`."""
    info = await js.consumer_info(subjects.SYSTEM_STREAM, bus.rules_facts_durable(0))
    return info.delivered.stream_seq >= last_seq


async def test_a_rule_signalled_before_its_commit_is_loaded_once_committed(
    service_env, data_dir, nc, js, sessions
) -> None:  # type: ignore[no-untyped-def]
    """A change published inside its transaction: the rules service may reload before the
    commit, and must read again rather than wait for its periodic reload (30 s), even when
    the commit lags by seconds (under load)."""
    meter, light = unique_id("meter"), unique_id("light")
    await add_devices(sessions, meter, light)
    rules = Service("services.rules", service_env, data_dir).start()
    rule_id, spec = unique_id("rule"), rule_spec(meter, light, for_s=0)
    try:
        await eventually(lambda: "acquired" in rules.tail(), timeout=10)
        await eventually(lambda: _reloads(rules) > 0, timeout=10)
        reloads, known = _reloads(rules), _loaded(rules)
        async with sessions.begin() as session:
            record = RuleRecord(
                id=rule_id, name=spec.name, spec=msgspec.to_builtins(spec), enabled=True, version=1
            )
            session.add(record)
            await session.flush()
            fact = m.ChangeFact(
                what="rule",
                id=rule_id,
                change="created",
                actor="user:test",
                correlation_id=unique_id("corr"),
                time=m.now(),
                detail={"version": 1},
            )
            await bus.publish(js, subjects.rule_changed(rule_id), fact, msg_id=m.new_id())
            # Commit only after the signal's reload and four more reads (about 1.75 s): later
            # than the service once stopped reading again.
            await eventually(lambda: _reloads(rules) >= reloads + 5, timeout=10)
        # Committed: loaded well before the periodic reload, then evaluated.
        await eventually(lambda: _loaded(rules) == known + 1, timeout=10)
        await report(js, meter, 60.0, 1)
        fired = await eventually(lambda: _runs(js, rule_id), timeout=10)
    finally:
        rules.stop()
    assert [f.kind for f in fired] == ["fired"]


def _reloads(rules: Service) -> int:
    return len(re.findall(r"loaded \d+ rules", rules.tail(100_000)))


def _loaded(rules: Service) -> int:
    """How many rules the last reload loaded."""
    return int(re.findall(r"loaded (\d+) rules", rules.tail(100_000))[-1])
