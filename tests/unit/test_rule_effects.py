"""The rules engine's effects: in order per key, side by side across keys; and where a run
of actions stops (`plan_run`)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from libs import messages as m
from libs.episodes import plan_run
from services.rules.effects import Effects


def recorder(log: list[str], name: str, gate: asyncio.Event | None = None):  # type: ignore[no-untyped-def]
    async def effect() -> None:
        log.append(f"{name} start")
        if gate is not None:
            await gate.wait()
        log.append(f"{name} end")

    return effect


async def test_effects_of_one_key_run_in_order_and_other_keys_do_not_wait() -> None:
    effects, log, gate = Effects(), [], asyncio.Event()
    effects.submit("rule-a.light", recorder(log, "a1", gate))  # held up (a slow database)
    effects.submit("rule-a.light", recorder(log, "a2"))
    effects.submit("rule-b.light", recorder(log, "b1"))
    batch = effects.take()

    await asyncio.wait_for(asyncio.shield(batch[2]), 5)
    assert log == ["a1 start", "b1 start", "b1 end"]  # b1 done; a2 still waits for a1
    gate.set()
    await asyncio.wait_for(asyncio.gather(*batch), 5)
    assert log[3:] == ["a1 end", "a2 start", "a2 end"]
    assert effects.take() == []


async def test_a_failed_effect_stops_the_later_ones_of_its_key() -> None:
    effects, log = Effects(), []

    async def fails() -> None:
        raise ConnectionError("bus away")

    effects.submit("k", fails)
    effects.submit("k", recorder(log, "after"))
    first, second = effects.take()

    with pytest.raises(ConnectionError):
        await second
    assert first.done() and log == []


def rule(*actions: m.Action) -> m.Rule:
    trigger = m.EventTrigger(subject="events.button.press")
    return m.Rule(id="r", name="r", trigger=trigger, actions=list(actions), enabled=True, version=1)


def test_a_run_stops_just_after_a_delay_and_resumes_when_it_has_passed() -> None:
    now = datetime(2026, 11, 29, 20, 0, tzinfo=UTC)
    on = m.CommandAction(device_id="light", action="turn_on")
    off = m.CommandAction(device_id="light", action="turn_off")
    r = rule(on, m.DelayAction(for_="30s"), off)

    assert plan_run(r, 0, now) == (2, now + timedelta(seconds=30))
    assert plan_run(r, 2, now) == (3, None)
    assert plan_run(rule(on, off), 0, now) == (2, None)
