"""User rules over HTTP (`/api/v1/rules`)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import messages as m
from libs import subjects
from libs.db.models import RuleRun
from libs.settings import Settings
from tests.api import api_client
from tests.helpers import eventually, unique_id

RULES = "/api/v1/rules"


@pytest.fixture(scope="module")
async def client(settings: Settings, admin_token: str) -> AsyncIterator[AsyncTestClient]:
    async with api_client(settings, admin_token) as client:
        yield client


def rule(**changes: Any) -> dict[str, Any]:
    device_id = unique_id()
    return {
        "id": unique_id("rule"),
        "name": "Light on too long",
        "trigger": {
            "type": "threshold",
            "device_id": device_id,
            "attribute": "power_w",
            "above": 1.0,
            "for": 600,
        },
        "actions": [
            {"type": "command", "device_id": device_id, "action": "turn_off"},
            {"type": "set_state", "device_id": device_id},
        ],
    } | changes


async def test_rule_round_trip(client: AsyncTestClient) -> None:
    spec = rule()

    created = await client.post(RULES, json=spec)
    replaced = await client.put(f"{RULES}/{spec['id']}", json=spec | {"enabled": False})
    fetched = await client.get(f"{RULES}/{spec['id']}")
    deleted = await client.delete(f"{RULES}/{spec['id']}")
    gone = await client.get(f"{RULES}/{spec['id']}")

    assert created.status_code == 201
    body = created.json()
    assert (body["id"], body["name"], body["version"], body["enabled"]) == (
        spec["id"],
        spec["name"],
        1,
        True,
    )
    assert body["trigger"]["above"] == 1.0 and body["trigger"]["for"] == 600
    assert [a["type"] for a in body["actions"]] == ["command", "set_state"]
    assert body["actions"][0]["expires_s"] == 60.0  # the default, filled in
    assert replaced.status_code == 200
    assert (replaced.json()["version"], replaced.json()["enabled"]) == (2, False)
    assert fetched.json() == replaced.json()
    assert deleted.status_code == 204
    assert gone.status_code == 404


async def test_rules_are_listed_and_paged(client: AsyncTestClient) -> None:
    ids = sorted([(await client.post(RULES, json=rule())).json()["id"] for _ in range(3)])

    listed: list[str] = []
    cursor = None
    while True:
        params = {"limit": "2"} | ({"cursor": cursor} if cursor else {})
        page = (await client.get(RULES, params=params)).json()
        listed += [r["id"] for r in page["items"]]
        if (cursor := page["next_cursor"]) is None:
            break

    assert [i for i in listed if i in ids] == ids
    assert len(listed) == len(set(listed))


async def test_a_rule_without_an_id_gets_one(client: AsyncTestClient) -> None:
    spec = rule()
    del spec["id"]

    created = await client.post(RULES, json=spec)

    assert created.status_code == 201
    assert (await client.get(f"{RULES}/{created.json()['id']}")).status_code == 200


async def test_a_rule_id_that_exists_is_a_conflict(client: AsyncTestClient) -> None:
    spec = rule()
    await client.post(RULES, json=spec)

    assert (await client.post(RULES, json=spec)).status_code == 409


async def test_an_empty_band_is_refused_naming_the_trigger(client: AsyncTestClient) -> None:
    spec = rule()
    spec["trigger"] |= {"above": 20.0, "below": 10.0}

    response = await client.post(RULES, json=spec)

    assert response.status_code == 422
    [error] = response.json()["errors"]
    assert error["field"] == "$.trigger"
    assert "below" in error["message"]
    assert (await client.get(f"{RULES}/{spec['id']}")).status_code == 404


async def test_unknown_fields_are_refused_naming_them(client: AsyncTestClient) -> None:
    spec = rule()
    spec["trigger"]["treshold"] = 5

    response = await client.post(RULES, json=spec)

    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "$.trigger.treshold"


async def test_an_unknown_action_type_is_refused(client: AsyncTestClient) -> None:
    spec = rule()
    spec["actions"][0]["type"] = "email"

    response = await client.post(RULES, json=spec)

    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "$.actions[0].type"


async def test_replacing_with_another_id_is_refused(client: AsyncTestClient) -> None:
    spec = rule()
    await client.post(RULES, json=spec)

    response = await client.put(f"{RULES}/{spec['id']}", json=spec | {"id": "other"})

    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "$.id"


async def test_replacing_an_unknown_rule_is_not_found(client: AsyncTestClient) -> None:
    spec = rule()

    response = await client.put(f"{RULES}/{spec['id']}", json=spec)

    assert response.status_code == 404


async def test_every_change_tells_the_rules_service_and_the_audit(
    client: AsyncTestClient, nc: NATS
) -> None:
    spec = rule()
    signals: list[m.ChangeFact] = []

    async def on_change(msg: Msg) -> None:
        signals.append(m.change_fact_decoder.decode(msg.data))

    subscription = await nc.subscribe(subjects.rule_changed(spec["id"]), cb=on_change)
    await nc.flush()
    try:
        created = await client.post(RULES, json=spec)
        await client.put(f"{RULES}/{spec['id']}", json={**spec, "enabled": False})
        await client.delete(f"{RULES}/{spec['id']}")

        await eventually(lambda: len(signals) == 3)
    finally:
        await subscription.unsubscribe()
    assert [(f.what, f.id, f.change) for f in signals] == [
        ("rule", spec["id"], change) for change in ("created", "updated", "deleted")
    ]
    assert [(f.detail["version"], f.detail["enabled"]) for f in signals] == [
        (1, True),
        (2, False),
        (2, False),
    ]
    assert signals[0].correlation_id == created.headers["X-Correlation-Id"]
    assert {f.actor for f in signals} == {(await client.get("/api/v1/me")).json()["actor"]}


async def test_a_rules_runs_are_listed_newest_last(
    client: AsyncTestClient, sessions: async_sessionmaker[AsyncSession]
) -> None:
    spec = rule()
    await client.post(RULES, json=spec)
    start = m.now() - timedelta(minutes=5)
    first_seq = uuid.uuid4().int % 10**12  # unique, as the recorder's stream sequences are
    async with sessions.begin() as session:  # what the recorder writes
        for i, kind in enumerate(["fired", "cleared", "fired"]):
            session.add(
                RuleRun(
                    rule_id=spec["id"],
                    episode_id=f"episode-{i // 2}",
                    kind=kind,
                    time=start + timedelta(seconds=i),
                    device_id=spec["trigger"]["device_id"],
                    reason="power_w above 1.0 for 600s",
                    values={"power_w": 60.0},
                    outcomes=[{"action": "command", "ok": True}],
                    correlation_id=unique_id("corr"),
                    source_seq=first_seq + i,
                )
            )

    first = (await client.get(f"{RULES}/{spec['id']}/runs", params={"limit": "2"})).json()
    rest = (
        await client.get(
            f"{RULES}/{spec['id']}/runs", params={"limit": "2", "cursor": first["next_cursor"]}
        )
    ).json()

    assert [r["kind"] for r in first["items"] + rest["items"]] == ["fired", "cleared", "fired"]
    assert rest["next_cursor"] is None
    assert (await client.get(f"{RULES}/{unique_id()}/runs")).status_code == 404


async def test_a_notification_must_name_a_subscription_that_exists(
    client: AsyncTestClient,
) -> None:
    hook = await client.post(
        "/api/v1/subscriptions",
        json={"filter": "system.alert.>", "url": "https://93.184.216.34/hooks/smarthome"},
    )
    assert hook.status_code == 201, hook.text
    missing = rule(actions=[{"type": "notify", "message": "hot", "subscription_id": "nope"}])
    named = rule(
        actions=[{"type": "notify", "message": "hot", "subscription_id": hook.json()["id"]}]
    )

    refused = await client.post(RULES, json=missing)
    accepted = await client.post(RULES, json=named)

    assert refused.status_code == 422
    [error] = refused.json()["errors"]
    assert error["field"] == "$.actions[0].subscription_id"
    assert "'nope' does not exist" in error["message"]
    assert accepted.status_code == 201, accepted.text
    assert accepted.json()["actions"][0]["subscription_id"] == hook.json()["id"]
