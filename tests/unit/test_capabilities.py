"""What each device kind accepts (`libs.capabilities`)."""

from __future__ import annotations

from typing import Any

import pytest

from libs import capabilities


@pytest.mark.parametrize(
    ("kind", "action", "params"),
    [
        ("light", "turn_on", {}),
        ("light", "turn_off", {}),
        ("light", "toggle", {}),
        ("light", "set_brightness", {"level": 0}),
        ("light", "set_brightness", {"level": 100}),
        ("energy_meter", "reset_energy", {}),
        ("switch", "toggle", {}),
        ("thermostat", "set_target", {"celsius": 21.5}),
        ("thermostat", "set_target", {"celsius": 19}),
        ("acme_blinds", "roll_up", {"speed": "slow"}),  # a kind we do not know: anything goes
    ],
)
def test_an_action_the_kind_accepts_passes(kind: str, action: str, params: dict[str, Any]) -> None:
    assert capabilities.check_action(kind, action, params) is None


@pytest.mark.parametrize(
    ("kind", "action", "params", "field", "reason"),
    [
        (
            "light",
            "fly",
            {},
            "action",
            "a light has no action 'fly'; it accepts turn_on, turn_off, toggle, set_brightness",
        ),
        (
            "energy_meter",
            "turn_off",
            {},
            "action",
            "an energy_meter has no action 'turn_off'; it accepts reset_energy",
        ),
        (
            "sensor",
            "turn_on",
            {},
            "action",
            "a sensor has no action 'turn_on'; it accepts no actions",
        ),
        (
            "switch",
            "set_brightness",
            {"level": 5},
            "action",
            "it accepts turn_on, turn_off, toggle",
        ),
        ("light", "set_brightness", {}, "params.level", "needs params.level: an integer 0-100"),
        ("light", "set_brightness", {"level": 101}, "params.level", "an integer 0-100, got 101"),
        ("light", "set_brightness", {"level": 50.5}, "params.level", "got 50.5"),
        ("light", "set_brightness", {"level": True}, "params.level", "got True"),
        ("light", "set_brightness", {"level": "50"}, "params.level", "got '50'"),
        (
            "light",
            "set_brightness",
            {"level": 5, "colour": "red"},
            "params.colour",
            "set_brightness takes no param 'colour' (it takes level)",
        ),
        ("light", "turn_on", {"level": 5}, "params.level", "turn_on takes no param 'level'"),
        ("thermostat", "set_target", {}, "params.celsius", "needs params.celsius: a number"),
        ("thermostat", "set_target", {"celsius": "warm"}, "params.celsius", "a number, got 'warm'"),
    ],
)
def test_an_action_the_kind_lacks_says_which_field_and_why(
    kind: str, action: str, params: dict[str, Any], field: str, reason: str
) -> None:
    problem = capabilities.action_problem(kind, action, params)

    assert problem is not None
    assert problem.field == field
    assert reason in problem.reason
    assert capabilities.check_action(kind, action, params) == problem.reason


def test_the_known_kinds_list_their_actions_and_others_accept_any() -> None:
    assert capabilities.accepted_actions("light") == (
        "turn_on",
        "turn_off",
        "toggle",
        "set_brightness",
    )
    assert capabilities.accepted_actions("sensor") == ()
    assert capabilities.accepted_actions("acme_blinds") is None
