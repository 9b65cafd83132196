"""The simulator's virtual devices: what they report and how they answer commands."""

from __future__ import annotations

from devices.simulator.__main__ import next_due
from devices.simulator.fleet import fleet


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
