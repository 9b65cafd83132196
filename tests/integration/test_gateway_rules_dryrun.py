"""Trying rules over recorded history (`POST /api/v1/rules/{id}/test`, `POST /rules/test`) and
refusing rules whose commands their devices cannot take."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import subjects
from libs.db.models import AuditEntry, CommandRecord, HistoryEntry
from libs.settings import Settings
from services.gateway.rules import dry_run
from tests.api import api_client
from tests.helpers import unique_id

RULES = "/api/v1/rules"
DEVICES = "/api/v1/devices"


@pytest.fixture(scope="module")
async def client(settings: Settings, admin_token: str) -> AsyncIterator[AsyncTestClient]:
    async with api_client(settings, admin_token) as client:
        yield client


@pytest.fixture
def start() -> datetime:
    """A whole second an hour ago: the history is in the past, as recorded history is."""
    return (datetime.now(UTC) - timedelta(hours=1)).replace(microsecond=0)


async def register(client: AsyncTestClient, kind: str) -> str:
    device_id = unique_id(kind)
    response = await client.post(DEVICES, json={"id": device_id, "name": kind, "kind": kind})
    assert response.status_code == 201, response.text
    return device_id


async def record(
    sessions: async_sessionmaker[AsyncSession],
    device_id: str,
    rows: list[tuple[datetime, dict[str, Any]]],
    event_type: str = "telemetry",
) -> None:
    """What the recorder would have written for these readings."""
    first_seq = uuid.uuid4().int % 10**12  # unique, as the stream's sequences are
    async with sessions.begin() as session:
        for i, (time, data) in enumerate(rows):
            session.add(
                HistoryEntry(
                    device_id=device_id,
                    time=time,
                    type=event_type,
                    data=data,
                    stream="EVENTS",
                    source_seq=first_seq + i,
                )
            )


def stretches(
    start: datetime, *spans: tuple[float, int], every: int = 10
) -> list[tuple[datetime, dict[str, Any]]]:
    """`power_w` readings every `every` seconds: each (value, seconds) held in turn."""
    rows, at = [], start
    for value, seconds in spans:
        rows += [(at + timedelta(seconds=s), {"power_w": value}) for s in range(0, seconds, every)]
        at += timedelta(seconds=seconds)
    return [*rows, (at, {"power_w": 0.0})]


def threshold_rule(meter: str, light: str, **changes: Any) -> dict[str, Any]:
    return {
        "id": unique_id("rule"),
        "name": "Meter drawing power",
        "trigger": {
            "type": "threshold",
            "device_id": meter,
            "attribute": "power_w",
            "above": 1.0,
            "for": "30s",
        },
        "actions": [{"type": "command", "device_id": light, "action": "turn_off"}],
    } | changes


def window(since: datetime, until: datetime) -> dict[str, str]:
    return {"since": since.isoformat(), "until": until.isoformat()}


def at(value: str) -> datetime:
    return datetime.fromisoformat(value)


async def assert_nothing_sent(sent: list[str], sessions, device_id: str) -> None:  # type: ignore[no-untyped-def]
    """A dry-run published no command to the device and recorded none."""
    assert subjects.commands(device_id) not in sent
    async with sessions() as session:
        stored = await session.scalar(
            select(func.count())
            .select_from(CommandRecord)
            .where(CommandRecord.device_id == device_id)
        )
    assert stored == 0


async def dry_run_watching_commands(  # type: ignore[no-untyped-def]
    client, nc, rule_id: str, since: datetime, until: datetime
) -> tuple[Any, list[str]]:
    """Dry-run a stored rule while listening on every command subject: (response, subjects
    of the commands that went out, which must be none)."""
    sent: list[str] = []

    async def on_command(msg: Msg) -> None:
        sent.append(msg.subject)

    subscription = await nc.subscribe(subjects.COMMANDS_ALL, cb=on_command)
    try:
        response = await client.post(f"{RULES}/{rule_id}/test", json=window(since, until))
        await nc.flush()
    finally:
        await subscription.unsubscribe()
    return response, sent


async def test_a_dry_run_says_when_the_rule_would_have_fired_and_sends_nothing(
    client: AsyncTestClient,
    sessions: async_sessionmaker[AsyncSession],
    nc: NATS,
    start: datetime,
) -> None:
    meter, light = unique_id("meter"), await register(client, "light")
    # 20 s of power is too short for `for 30s`; the second stretch holds 100 s.
    readings = stretches(start, (60.0, 20), (0.0, 40), (55.0, 100))
    await record(sessions, meter, readings)
    spec = threshold_rule(meter, light)
    spec["actions"] += [
        {"type": "set_state", "device_id": meter},
        {"type": "delay", "for": "5s"},
        {"type": "notify", "message": "meter on for 30 s"},
    ]
    assert (await client.post(RULES, json=spec)).status_code == 201
    response, sent = await dry_run_watching_commands(
        client, nc, spec["id"], start, start + timedelta(minutes=10)
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["rule_id"] == spec["id"]
    assert body["evaluated_rows"] == len(readings)
    [firing] = body["firings"]
    second_stretch = start + timedelta(seconds=60)
    assert at(firing["at"]) == second_stretch + timedelta(seconds=30)
    assert firing["device_id"] == meter
    assert "power_w = 55" in firing["reason"]
    command, mark, delay, notify = firing["would_send"]
    assert command == {
        "type": "command",
        "at": firing["at"],
        "subject": subjects.commands(light),
        "skipped": None,
        "device_id": light,
        "action": "turn_off",
        "params": {},
        "expires_s": 60.0,
    }
    assert (mark["type"], mark["skipped"]) == ("set_state", f"device {meter} is not registered")
    assert (delay["type"], delay["seconds"]) == ("delay", 5.0)
    assert (notify["type"], notify["message"]) == ("notify", "meter on for 30 s")
    assert at(notify["at"]) == at(firing["at"]) + timedelta(seconds=5)
    await assert_nothing_sent(sent, sessions, light)


async def test_a_rule_body_is_tried_before_it_is_saved(
    client: AsyncTestClient, sessions: async_sessionmaker[AsyncSession], start: datetime
) -> None:
    meter, light = unique_id("meter"), await register(client, "light")
    # Both stretches hold longer than `for 30s`: each is an episode that fires once.
    await record(sessions, meter, stretches(start, (60.0, 40), (0.0, 20), (55.0, 100)))
    spec = threshold_rule(meter, light)
    del spec["id"]

    response = await client.post(
        f"{RULES}/test",
        json={"rule": spec} | window(start - timedelta(minutes=1), start + timedelta(minutes=5)),
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["rule_id"] is None
    assert [at(f["at"]) for f in body["firings"]] == [
        start + timedelta(seconds=30),
        start + timedelta(seconds=60 + 30),
    ]


async def test_a_selector_replays_the_devices_it_matches(
    client: AsyncTestClient, sessions: async_sessionmaker[AsyncSession], start: datetime
) -> None:
    home = unique_id("home")
    inside, outside = unique_id("meter"), unique_id("meter")
    for device_id, location in ((inside, f"{home}/kitchen"), (outside, "elsewhere")):
        body = {"id": device_id, "name": "meter", "kind": "energy_meter", "location": location}
        assert (await client.post(DEVICES, json=body)).status_code == 201
        await record(sessions, device_id, stretches(start, (60.0, 60)))
    spec = threshold_rule(inside, unique_id("light"))
    del spec["trigger"]["device_id"]
    spec["trigger"]["selector"] = {"kind": "energy_meter", "location": home}

    response = await client.post(
        f"{RULES}/test", json={"rule": spec} | window(start, start + timedelta(minutes=5))
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert [(f["device_id"], at(f["at"])) for f in body["firings"]] == [
        (inside, start + timedelta(seconds=30))
    ]
    assert body["evaluated_rows"] == len(stretches(start, (60.0, 60)))


async def test_an_event_rule_fires_on_each_matching_recorded_event(
    client: AsyncTestClient, sessions: async_sessionmaker[AsyncSession], start: datetime
) -> None:
    button, light = unique_id("button"), await register(client, "light")
    presses = [(start + timedelta(seconds=i), {"pressed": i % 2 == 0}) for i in range(4)]
    await record(sessions, button, presses, event_type="button")
    spec = threshold_rule(button, light)
    spec["trigger"] = {
        "type": "event",
        "subject": subjects.device_events(button, "button"),
        "match": {"pressed": True},
    }

    response = await client.post(
        f"{RULES}/test", json={"rule": spec} | window(start, start + timedelta(minutes=1))
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert [at(f["at"]) for f in body["firings"]] == [start, start + timedelta(seconds=2)]
    assert body["evaluated_rows"] == 4
    assert (await client.get(f"{RULES}/{spec['id']}")).status_code == 404  # nothing stored


async def test_a_schedule_fires_at_its_cron_times_without_reading_history(
    client: AsyncTestClient,
) -> None:
    spec = threshold_rule(unique_id("meter"), unique_id("light"))
    spec["trigger"] = {"type": "schedule", "cron": "0 * * * *"}
    since = datetime(2025, 3, 1, 6, 30, tzinfo=UTC)

    response = await client.post(
        f"{RULES}/test", json={"rule": spec} | window(since, since + timedelta(hours=3))
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert [at(f["at"]).hour for f in body["firings"]] == [7, 8, 9]
    assert body["evaluated_rows"] == 0
    assert body["firings"][0]["would_send"][0]["skipped"].endswith("is not registered")


@pytest.mark.parametrize(
    ("since", "until", "field", "message"),
    [
        ("2025-03-01T10:00:00Z", "2025-03-01T10:00:00Z", "$.until", "after `since`"),
        ("2025-03-01T10:00:00Z", "2025-03-01T09:00:00Z", "$.until", "after `since`"),
        ("2025-03-01T10:00:00Z", "2025-04-02T10:00:01Z", "$.until", "31 days"),
        ("2025-03-01T10:00:00", "2025-03-01T11:00:00Z", "$.since", "timezone"),
        ("yesterday", "2025-03-01T11:00:00Z", "$.since", "datetime"),
        ("2025-03-01T10:00:00Z", None, "$.until", "missing required field"),
    ],
)
async def test_a_window_that_is_not_one_is_refused_naming_the_field(
    client: AsyncTestClient, since: str, until: str | None, field: str, message: str
) -> None:
    spec = threshold_rule(unique_id("meter"), unique_id("light"))
    await client.post(RULES, json=spec)
    body = {"since": since} | ({"until": until} if until else {})

    stored = await client.post(f"{RULES}/{spec['id']}/test", json=body)
    unsaved = await client.post(f"{RULES}/test", json={"rule": spec} | body)

    for response in (stored, unsaved):
        assert response.status_code == 422
        [error] = response.json()["errors"]
        assert error["field"] == field
        assert message in error["message"]


async def test_a_window_holding_too_many_rows_asks_to_narrow_it(
    client: AsyncTestClient,
    sessions: async_sessionmaker[AsyncSession],
    start: datetime,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    meter = unique_id("meter")
    await record(sessions, meter, stretches(start, (60.0, 60)))
    monkeypatch.setattr(dry_run, "MAX_ROWS", 3)
    spec = threshold_rule(meter, unique_id("light"))

    response = await client.post(
        f"{RULES}/test", json={"rule": spec} | window(start, start + timedelta(minutes=5))
    )

    assert response.status_code == 422
    assert "narrow it" in response.json()["detail"]


async def test_dry_running_an_unknown_rule_is_not_found(
    client: AsyncTestClient, start: datetime
) -> None:
    response = await client.post(
        f"{RULES}/{unique_id('rule')}/test", json=window(start, start + timedelta(minutes=1))
    )

    assert response.status_code == 404


def offline_rule(device: str, light: str, **trigger: Any) -> dict[str, Any]:
    return {
        "id": unique_id("rule"),
        "name": "Device offline too long",
        "trigger": {
            "type": "state",
            "device_id": device,
            "attribute": "connection",
            "to": "offline",
            "for": "2m",
        }
        | trigger,
        "actions": [
            {"type": "command", "device_id": light, "action": "turn_on"},
            {"type": "notify", "message": "the meter is offline"},
        ],
    }


async def test_a_state_trigger_fires_when_a_device_stays_offline_longer_than_for(
    client: AsyncTestClient,
    sessions: async_sessionmaker[AsyncSession],
    nc: NATS,
    start: datetime,
) -> None:
    meter, light = await register(client, "energy_meter"), await register(client, "light")
    s = timedelta(seconds=1)
    # Offline for 30 s (shorter than `for 2m`), then for 280 s.
    await record(sessions, meter, [(start, {}), (start + 90 * s, {})], event_type="hello")
    await record(sessions, meter, [(start + 10 * s, {"power_w": 12.0})])
    await record(
        sessions, meter, [(start + 60 * s, {}), (start + 120 * s, {})], event_type="goodbye"
    )
    await record(sessions, meter, [(start + 400 * s, {})], event_type="hello")
    spec = offline_rule(meter, light)
    assert (await client.post(RULES, json=spec)).status_code == 201
    response, sent = await dry_run_watching_commands(
        client, nc, spec["id"], start, start + timedelta(minutes=10)
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["evaluated_rows"] == 6
    [firing] = body["firings"]
    assert at(firing["at"]) == start + 120 * s + timedelta(minutes=2)
    assert firing["device_id"] == meter
    assert firing["reason"] == f"connection offline on {meter} held for 120s"
    command, notify = firing["would_send"]
    assert command == {
        "type": "command",
        "at": firing["at"],
        "subject": subjects.commands(light),
        "skipped": None,
        "device_id": light,
        "action": "turn_on",
        "params": {},
        "expires_s": 60.0,
    }
    assert (notify["type"], notify["message"]) == ("notify", "the meter is offline")
    await assert_nothing_sent(sent, sessions, light)


async def test_a_heartbeat_timeout_in_the_audit_log_takes_the_device_offline(
    client: AsyncTestClient, sessions: async_sessionmaker[AsyncSession], start: datetime
) -> None:
    meter, light = unique_id("meter"), unique_id("light")
    s = timedelta(seconds=1)
    # Heartbeats are not history: the actors' timeout is in the audit log.
    await record(sessions, meter, [(start, {"power_w": 3.0}), (start + 300 * s, {"power_w": 4.0})])
    async with sessions.begin() as session:
        session.add(
            AuditEntry(
                time=start + 40 * s,
                actor="platform:actors",
                action="state.changed",
                device_id=meter,
                result="active->active (offline)",
                detail={"version": 2, "changed": ["connection"], "cause": "presence_timeout"},
                stream="SYSTEM",
                source_seq=uuid.uuid4().int % 10**12,
            )
        )
    spec = offline_rule(meter, light, **{"from": "online", "for": "1m"})
    del spec["id"]

    response = await client.post(
        f"{RULES}/test", json={"rule": spec} | window(start, start + timedelta(minutes=10))
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["evaluated_rows"] == 3
    assert [(f["device_id"], at(f["at"])) for f in body["firings"]] == [
        (meter, start + 40 * s + timedelta(minutes=1))
    ]
    assert body["firings"][0]["reason"] == (f"connection online → offline on {meter} held for 60s")


async def test_a_state_trigger_follows_the_state_the_actors_derive(
    client: AsyncTestClient, sessions: async_sessionmaker[AsyncSession], start: datetime
) -> None:
    light = unique_id("light")
    s = timedelta(seconds=1)
    # On for 20 s, off for 60 s, on for 100 s: only the second stretch of `active` lasts 30 s.
    await record(
        sessions,
        light,
        [
            (start, {"on": True}),
            (start + 20 * s, {"on": False}),
            (start + 80 * s, {"on": True}),
            (start + 180 * s, {"on": False}),
        ],
        event_type="state",
    )
    spec = offline_rule(light, unique_id("light"))
    spec["trigger"] = {"type": "state", "device_id": light, "to": "active", "for": "30s"}

    response = await client.post(
        f"{RULES}/test", json={"rule": spec} | window(start, start + timedelta(minutes=5))
    )

    assert response.status_code == 200, response.text
    assert [at(f["at"]) for f in response.json()["firings"]] == [start + 110 * s]


# --- what a rule's commands may ask of their devices -------------------------------------


async def test_a_command_the_device_kind_lacks_is_refused_naming_the_field(
    client: AsyncTestClient,
) -> None:
    light = await register(client, "light")
    spec = threshold_rule(unique_id("meter"), light)
    spec["actions"][0]["action"] = "fly"

    response = await client.post(RULES, json=spec)

    assert response.status_code == 422
    [error] = response.json()["errors"]
    assert error == {
        "field": "$.actions[0].action",
        "message": "a light has no action 'fly'; it accepts turn_on, turn_off, toggle, "
        "set_brightness",
    }
    assert (await client.get(f"{RULES}/{spec['id']}")).status_code == 404


async def test_a_command_with_params_the_action_cannot_take_is_refused(
    client: AsyncTestClient,
) -> None:
    light = await register(client, "light")
    spec = threshold_rule(unique_id("meter"), light)
    spec["actions"].insert(0, {"type": "notify", "message": "dimming"})
    spec["actions"][1] |= {"action": "set_brightness", "params": {"level": 150}}

    response = await client.post(RULES, json=spec)

    assert response.status_code == 422
    [error] = response.json()["errors"]
    assert error["field"] == "$.actions[1].params.level"
    assert "0-100" in error["message"]


async def test_a_replacement_and_a_tried_rule_are_checked_as_a_new_rule_is(
    client: AsyncTestClient, start: datetime
) -> None:
    meter = await register(client, "energy_meter")
    spec = threshold_rule(unique_id("meter"), meter)
    spec["actions"][0]["action"] = "reset_energy"
    assert (await client.post(RULES, json=spec)).status_code == 201
    wrong = {**spec, "actions": [{"type": "command", "device_id": meter, "action": "turn_off"}]}

    replaced = await client.put(f"{RULES}/{spec['id']}", json=wrong)
    tried = await client.post(
        f"{RULES}/test", json={"rule": wrong} | window(start, start + timedelta(minutes=1))
    )

    assert replaced.status_code == 422
    assert replaced.json()["errors"][0]["field"] == "$.actions[0].action"
    assert "an energy_meter has no action 'turn_off'" in replaced.json()["detail"]
    assert tried.status_code == 422
    assert tried.json()["errors"][0]["field"] == "$.rule.actions[0].action"
    assert (await client.get(f"{RULES}/{spec['id']}")).json()["version"] == 1


async def test_a_rule_may_command_a_device_that_is_not_registered_yet(
    client: AsyncTestClient,
) -> None:
    spec = threshold_rule(unique_id("meter"), unique_id("light"))
    spec["actions"][0]["action"] = "anything_at_all"

    assert (await client.post(RULES, json=spec)).status_code == 201


async def test_a_device_of_a_kind_the_platform_does_not_know_takes_any_command(
    client: AsyncTestClient,
) -> None:
    blinds = await register(client, "acme_blinds")
    spec = threshold_rule(unique_id("meter"), blinds)
    spec["actions"][0] |= {"action": "roll_up", "params": {"speed": "slow"}}

    assert (await client.post(RULES, json=spec)).status_code == 201


async def test_the_id_test_is_reserved_for_dry_runs(client: AsyncTestClient) -> None:
    spec = threshold_rule(unique_id("meter"), unique_id("light"), id="test")

    response = await client.post(RULES, json=spec)

    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "$.id"


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"type": "humidity"}, "$.trigger.type", "Invalid value 'humidity'"),
        ({"attribute": 5}, "$.trigger.attribute", "Expected `str`, got `int`"),
        ({"above": 20.0, "below": 10.0}, "$.trigger", "`below` must be greater than `above`"),
        ({"for": "10x"}, "$.trigger", "'10x' is not a duration"),
        (
            {"type": "schedule", "cron": "0 0 7 * * *"},
            "$.trigger",
            "`cron` needs 5 fields",
        ),
    ],
)
async def test_an_invalid_trigger_is_refused_naming_the_field_and_the_reason(
    client: AsyncTestClient, change: dict[str, Any], field: str, message: str
) -> None:
    spec = threshold_rule(unique_id("meter"), unique_id("light"))
    if change.get("type") == "schedule":
        spec["trigger"] = change
    else:
        spec["trigger"] |= change

    response = await client.post(RULES, json=spec)

    assert response.status_code == 422
    [error] = response.json()["errors"]
    assert error["field"] == field
    assert message in error["message"]


async def test_a_dry_run_does_not_command_a_pending_device_as_the_engine_would_not(
    client: AsyncTestClient,
    sessions: async_sessionmaker[AsyncSession],
    nc: NATS,
    start: datetime,
) -> None:
    """The dry run and the rules service share one answer to "may this rule command this
    device": a light waiting for approval is not commanded by either."""
    meter, light = unique_id("meter"), await register(client, "light")
    waiting = await client.patch(f"{DEVICES}/{light}", json={"lifecycle": "pending"})
    assert waiting.status_code == 200, waiting.text
    await record(sessions, meter, stretches(start, (60.0, 100)))
    spec = threshold_rule(meter, light)
    assert (await client.post(RULES, json=spec)).status_code == 201

    response, sent = await dry_run_watching_commands(
        client, nc, spec["id"], start, start + timedelta(minutes=10)
    )

    assert response.status_code == 200, response.text
    [firing] = response.json()["firings"]
    [command] = firing["would_send"]
    assert command["skipped"] == f"device {light} is pending, not active"
    await assert_nothing_sent(sent, sessions, light)
