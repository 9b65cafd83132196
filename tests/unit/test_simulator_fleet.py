"""The simulator's virtual devices: what they report and how they answer commands."""

from __future__ import annotations

import random

from devices.simulator.fleet import fleet
from devices.simulator.schedule import Schedule, next_due


def test_kinds_are_taken_in_turn_and_a_seed_repeats_a_run() -> None:
    devices = fleet("sim", 5, ("sensor", "light"), seed=7)
    again = fleet("sim", 5, ("sensor", "light"), seed=7)

    assert [(d.id, d.kind) for d in devices] == [
        ("sim-0", "sensor"),
        ("sim-1", "light"),
        ("sim-2", "sensor"),
        ("sim-3", "light"),
        ("sim-4", "sensor"),
    ]
    assert [d.reading(1.0) for d in devices] == [d.reading(1.0) for d in again]


def test_a_sensor_wanders_within_its_range() -> None:
    [sensor] = fleet("s", 1, ("sensor",), seed=1)
    readings = [sensor.reading(1.0) for _ in range(2000)]
    assert all(5.0 <= r["temperature_c"] <= 35.0 for r in readings)  # type: ignore[operator]
    assert len({r["temperature_c"] for r in readings}) > 10


def test_a_meter_counts_energy_from_its_power() -> None:
    [meter] = fleet("m", 1, ("energy_meter",), seed=1)
    first = meter.reading(3600.0)
    second = meter.reading(3600.0)
    assert second["energy_wh"] == round(first["energy_wh"] + second["power_w"], 4)  # type: ignore[operator]
    assert meter.command("reset_energy", {}) is None
    assert meter.attributes["energy_wh"] == 0.0


def test_a_light_answers_its_commands_and_refuses_others() -> None:
    [light] = fleet("l", 1, ("light",), seed=1)

    assert light.command("turn_off", {}) is None
    assert (light.attributes["on"], light.attributes["power_w"]) == (False, 0.0)
    assert light.command("toggle", {}) is None
    assert light.command("set_brightness", {"level": 50}) is None
    assert (light.attributes["on"], light.attributes["power_w"]) == (True, 30.0)
    assert (
        light.command("set_brightness", {"level": 150}) == "params.level must be an integer 0-100"
    )
    assert light.command("open", {}) == "a light has no action 'open'"


def test_readings_keep_their_phase_when_a_publish_is_slow() -> None:
    # Due at 3 s, every 10 s: a publish that ends late moves neither the next reading nor
    # the device's phase; one late by more than an interval skips what it missed.
    assert next_due(3.0, now=3.4, interval=10.0) == 13.0
    assert next_due(3.0, now=12.9, interval=10.0) == 13.0
    assert next_due(3.0, now=27.5, interval=10.0) == 33.0


def test_the_schedule_gives_each_device_its_own_phase_and_keeps_it() -> None:
    schedule = Schedule(3, interval=10.0, now=100.0, rng=random.Random(4))
    first = {}
    for now in (x / 10 for x in range(1000, 1101)):  # 100.0 .. 110.0 s, every 0.1 s
        for i, elapsed in schedule.take_due(now):
            assert i not in first, "a device reported twice in its first interval"
            first[i] = (now, elapsed)
    assert sorted(first) == [0, 1, 2]
    phases = {round(now, 1) for now, _ in first.values()}
    assert len(phases) == 3, "every device at the same moment: no phases"
    # A late look (at 125 s) gives each device once, with the time since its last reading,
    # and its next reading stays on its phase (a whole number of intervals after its first).
    late = dict(schedule.take_due(125.0))
    assert sorted(late) == [0, 1, 2]
    for i, elapsed in late.items():
        assert elapsed == 125.0 - first[i][0]
    assert schedule.take_due(125.0) == []
    again = {}
    for now in (x / 10 for x in range(1251, 1351)):  # 125.1 .. 135.0 s
        again.update({i: now for i, _ in schedule.take_due(now)})
    assert {i: round(again[i] - first[i][0], 1) for i in again} == {0: 30.0, 1: 30.0, 2: 30.0}
