"""The device registry over HTTP: what a user of `/api/v1/devices` sees."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import bus, subjects
from libs import messages as m
from libs.db.models import DeviceState, HistoryEntry
from tests.factories import register_device
from tests.helpers import eventually, unique_id
from tests.integration.test_rules import collected
from tests.processes import Service

DEVICES = "/api/v1/devices"


async def test_registry_round_trip(client: AsyncTestClient) -> None:
    device_id = unique_id()
    # A home of its own: another test may have defined `home` with other floors.
    location = f"{unique_id('home')}/ground/kitchen"
    created = await client.post(
        DEVICES,
        json={
            "id": device_id,
            "name": "Kitchen lamp",
            "kind": "light",
            "location": location,
            "metadata": {"vendor": "acme"},
        },
    )
    assert created.status_code == 201
    body = created.json()
    # Its bus credentials, shown this once (only their hash is kept).
    credentials = body.pop("credentials")
    assert credentials["username"] == device_id and credentials["password"].startswith("smd_")
    assert body | {"created_at": None, "updated_at": None} == {
        "id": device_id,
        "name": "Kitchen lamp",
        "kind": "light",
        "location": location,
        "lifecycle": "active",
        "enabled": True,
        "metadata": {"vendor": "acme"},
        "created_at": None,
        "updated_at": None,
        # Never heard from: the runtime state is a fresh one.
        "state": "off",
        "connection": "offline",
        "attributes": {},
        "last_seen": None,
        "version": 0,
        # No attribute reported yet, none expected of a light on a schedule.
        "report_intervals": {},
        "reports": {},
        "presence": "offline",
        # What the UI offers as buttons: the light kind's actions, with their params.
        "actions": [
            {"name": "turn_on", "params": []},
            {"name": "turn_off", "params": []},
            {"name": "toggle", "params": []},
            {
                "name": "set_brightness",
                "params": [
                    {
                        "name": "level",
                        "expected": "an integer 0-100",
                        "integer": True,
                        "low": 0,
                        "high": 100,
                    }
                ],
            },
        ],
    }

    patched = await client.patch(
        f"{DEVICES}/{device_id}", json={"name": "Hall lamp", "location": None}
    )
    assert patched.status_code == 200
    assert (patched.json()["name"], patched.json()["location"]) == ("Hall lamp", None)
    assert patched.json()["metadata"] == {"vendor": "acme"}  # absent fields stay

    fetched = await client.get(f"{DEVICES}/{device_id}")
    assert fetched.json() == patched.json()

    assert (await client.delete(f"{DEVICES}/{device_id}")).status_code == 204
    gone = await client.get(f"{DEVICES}/{device_id}")
    assert gone.status_code == 404
    assert gone.headers["content-type"] == "application/problem+json"


async def test_registering_an_existing_id_is_a_conflict(client: AsyncTestClient) -> None:
    device = await register_device(client)

    again = await client.post(DEVICES, json={"id": device["id"], "name": "Other", "kind": "light"})

    assert again.status_code == 409
    problem = again.json()
    assert problem["status"] == 409
    assert problem["errors"][0]["field"] == "$.id"


async def test_an_id_is_generated_when_absent(client: AsyncTestClient) -> None:
    response = await client.post(DEVICES, json={"name": "Meter", "kind": "energy_meter"})

    assert response.status_code == 201
    device_id = response.json()["id"]
    assert (await client.get(f"{DEVICES}/{device_id}")).json()["kind"] == "energy_meter"


async def test_filters_by_kind_and_location_prefix(client: AsyncTestClient) -> None:
    kind = unique_id("kind")
    home = unique_id("home")
    kitchen = await register_device(client, kind=kind, location=f"{home}/ground/kitchen")
    hall = await register_device(client, kind=kind, location=f"{home}/ground/hall")
    attic = await register_device(client, kind=kind, location=f"{home}/attic")
    await register_device(client, kind=kind, location=f"{home}x/ground")  # same prefix, not a path

    async def ids(**params: str) -> set[str]:
        response = await client.get(DEVICES, params={"kind": kind, **params})
        assert response.status_code == 200
        return {d["id"] for d in response.json()["items"]}

    assert await ids(location=f"{home}/ground") == {kitchen["id"], hall["id"]}
    assert await ids(location=home) == {kitchen["id"], hall["id"], attic["id"]}
    assert await ids(location=f"{home}/ground/kitchen") == {kitchen["id"]}


async def test_filters_by_runtime_state_and_connection(
    client: AsyncTestClient, sessions: async_sessionmaker[AsyncSession]
) -> None:
    kind = unique_id("kind")
    online = await register_device(client, kind=kind)
    silent = await register_device(client, kind=kind)
    async with sessions.begin() as session:  # what the actors write
        session.add(
            DeviceState(
                device_id=online["id"],
                state="active",
                connection="online",
                attributes={"power_w": 60.0},
                last_seen=m.now(),
                version=3,
                last_seq=3,
            )
        )

    active = await client.get(DEVICES, params={"kind": kind, "state": "active"})
    offline = await client.get(DEVICES, params={"kind": kind, "connection": "offline"})

    [item] = active.json()["items"]
    assert item["id"] == online["id"]
    assert (item["connection"], item["attributes"], item["version"]) == (
        "online",
        {"power_w": 60.0},
        3,
    )
    assert [d["id"] for d in offline.json()["items"]] == [silent["id"]]


async def test_pages_through_every_device_once(client: AsyncTestClient) -> None:
    kind = unique_id("kind")
    registered = {(await register_device(client, kind=kind))["id"] for _ in range(5)}

    seen: list[str] = []
    pages = 0
    cursor = None
    while True:
        params = {"kind": kind, "limit": "2"} | ({"cursor": cursor} if cursor else {})
        page = (await client.get(DEVICES, params=params)).json()
        seen += [d["id"] for d in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert pages == 3
    assert seen == sorted(registered)


async def test_registry_changes_are_published_with_the_correlation_id(
    client: AsyncTestClient,
) -> None:
    device_id = unique_id()
    headers = {"X-Correlation-Id": unique_id("corr")}

    created = await client.post(
        DEVICES, json={"id": device_id, "name": "Lamp", "kind": "light"}, headers=headers
    )
    await client.post(f"{DEVICES}/{device_id}/disconnect", headers=headers)
    await client.post(f"{DEVICES}/{device_id}/disconnect", headers=headers)  # no change
    await client.post(f"{DEVICES}/{device_id}/connect", headers=headers)
    await client.delete(f"{DEVICES}/{device_id}", headers=headers)

    assert created.headers["X-Correlation-Id"] == headers["X-Correlation-Id"]

    async def four_facts() -> list[dict[str, Any]]:
        # Published by the outbox's relay after each commit: a moment after the answer.
        replay = await client.get(
            "/api/v1/events", params={"subject": f"system.device.{device_id}.registry"}
        )
        facts = [item["event"] for item in replay.json()["items"]]
        assert len(facts) == 4, facts
        return facts

    facts = await eventually(four_facts, timeout=5)
    assert [f["change"] for f in facts] == ["created", "disconnected", "connected", "deleted"]
    assert {f["correlation_id"] for f in facts} == {headers["X-Correlation-Id"]}
    assert {f["actor"] for f in facts} == {(await client.get("/api/v1/me")).json()["actor"]}
    assert facts[1]["device"]["enabled"] is False


async def test_a_command_is_accepted_pending_and_can_be_followed(
    client: AsyncTestClient,
) -> None:
    device = await register_device(client)

    sent = await client.post(
        f"{DEVICES}/{device['id']}/commands",
        json={"action": "set_brightness", "params": {"level": 30}, "expires_s": 30},
    )

    assert sent.status_code == 202
    command = sent.json()
    assert (command["status"], command["action"], command["params"]) == (
        "pending",
        "set_brightness",
        {"level": 30},
    )
    assert command["correlation_id"] == sent.headers["X-Correlation-Id"]
    followed = await client.get(sent.headers["Location"])
    assert followed.status_code == 200
    assert followed.json()["id"] == command["id"]
    assert followed.json()["status"] == "pending"


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        ({"action": "open"}, "$.action", "a light has no action 'open'; it accepts turn_on"),
        (
            {"action": "set_brightness", "params": {"level": 150}},
            "$.params.level",
            "params.level must be an integer 0-100, got 150",
        ),
        ({"action": "turn_off", "params": {"fade_s": 2}}, "$.params.fade_s", "takes no param"),
    ],
)
async def test_a_command_its_device_kind_lacks_is_refused_naming_the_field(
    client: AsyncTestClient, body: dict, field: str, reason: str
) -> None:
    device = await register_device(client)

    refused = await client.post(f"{DEVICES}/{device['id']}/commands", json=body)

    assert refused.status_code == 422, refused.text
    assert refused.json()["errors"][0]["field"] == field
    assert reason in refused.json()["detail"]


async def test_a_command_to_an_unknown_device_is_not_found(client: AsyncTestClient) -> None:
    response = await client.post(f"{DEVICES}/{unique_id()}/commands", json={"action": "turn_off"})

    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"


async def test_a_command_to_a_disconnected_device_is_a_conflict(
    client: AsyncTestClient,
) -> None:
    device = await register_device(client)
    await client.post(f"{DEVICES}/{device['id']}/disconnect")

    refused = await client.post(f"{DEVICES}/{device['id']}/commands", json={"action": "turn_on"})
    await client.post(f"{DEVICES}/{device['id']}/connect")
    accepted = await client.post(f"{DEVICES}/{device['id']}/commands", json={"action": "turn_on"})

    assert refused.status_code == 409
    assert refused.json()["detail"] == "device is disconnected"
    assert accepted.status_code == 202


async def test_a_command_of_another_device_is_not_found(client: AsyncTestClient) -> None:
    first, second = await register_device(client), await register_device(client)
    sent = await client.post(f"{DEVICES}/{first['id']}/commands", json={"action": "turn_on"})

    response = await client.get(f"{DEVICES}/{second['id']}/commands/{sent.json()['id']}")

    assert response.status_code == 404


async def test_history_is_newest_last_filtered_and_paged(
    client: AsyncTestClient, sessions: async_sessionmaker[AsyncSession]
) -> None:
    device = await register_device(client)
    start = m.now() - timedelta(minutes=10)
    first_seq = uuid.uuid4().int % 10**12  # unique per (stream, seq), as the recorder's are
    async with sessions.begin() as session:  # what the recorder writes
        for i in range(5):
            session.add(
                HistoryEntry(
                    device_id=device["id"],
                    time=start + timedelta(minutes=i),
                    type="telemetry" if i % 2 == 0 else "state",
                    data={"power_w": float(i)},
                    stream="TEST",
                    source_seq=first_seq + i,
                )
            )
    url = f"{DEVICES}/{device['id']}/history"

    everything = (await client.get(url)).json()
    telemetry = (await client.get(url, params={"type": "telemetry"})).json()
    window = await client.get(
        url,
        params={
            "since": (start + timedelta(minutes=1)).isoformat(),
            "until": (start + timedelta(minutes=3)).isoformat(),
        },
    )
    first = (await client.get(url, params={"limit": "3"})).json()
    rest = (await client.get(url, params={"limit": "3", "cursor": first["next_cursor"]})).json()

    powers = [item["data"]["power_w"] for item in everything["items"]]
    assert powers == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert [item["data"]["power_w"] for item in telemetry["items"]] == [0.0, 2.0, 4.0]
    assert [item["data"]["power_w"] for item in window.json()["items"]] == [1.0, 2.0]
    assert [i["data"]["power_w"] for i in first["items"] + rest["items"]] == powers
    assert rest["next_cursor"] is None


async def test_history_of_an_unknown_device_is_not_found(client: AsyncTestClient) -> None:
    assert (await client.get(f"{DEVICES}/{unique_id()}/history")).status_code == 404


async def test_statistics_of_an_unknown_device_are_not_found(client: AsyncTestClient) -> None:
    response = await client.get(f"{DEVICES}/{unique_id()}/statistics")

    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"since": "yesterday"}, "since"),
        ({"until": "2026-13-01"}, "until"),
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"attribute": "x" * 129}, "attribute"),
        ({"cursor": "not-ours"}, "cursor"),
        ({"since": "2026-03-02T00:00:00Z", "until": "2026-03-01T00:00:00Z"}, "since"),
    ],
)
async def test_bad_statistics_params_are_refused_naming_the_field(
    client: AsyncTestClient, params: dict[str, str], field: str
) -> None:
    device = await register_device(client)

    response = await client.get(f"{DEVICES}/{device['id']}/statistics", params=params)

    assert response.status_code == 422, response.text
    assert [error["field"] for error in response.json()["errors"]] == [field]


async def test_a_kind_the_platform_does_not_know_lists_no_actions(client: AsyncTestClient) -> None:
    """Null, not []: such a device takes any action (it answers those it lacks as failed)."""
    created = await client.post(DEVICES, json={"name": "Gate", "kind": "garage_door"})
    assert created.status_code == 201, created.text
    assert created.json()["actions"] is None
    sensor = await client.post(DEVICES, json={"name": "Probe", "kind": "sensor"})
    assert sensor.json()["actions"] == []


async def test_a_name_with_a_control_character_is_refused_naming_it(
    client: AsyncTestClient,
) -> None:
    """Postgres refuses a NUL in text: refused here, on every database, with the field."""
    refused = await client.post(DEVICES, json={"name": "Lamp\u0000", "kind": "light"})

    assert refused.status_code == 422, refused.text
    assert refused.json()["errors"][0]["field"] == "$.name"
    assert (
        await client.post(DEVICES, json={"name": "Küche 💡", "kind": "light"})
    ).status_code == 201


async def test_a_device_that_says_hello_unregistered_waits_for_approval(
    client: AsyncTestClient, service_env, data_dir, js, sessions
) -> None:  # type: ignore[no-untyped-def]
    porch, odd = unique_id("porch"), unique_id("odd")
    actors = Service("services.actors", service_env, data_dir).start()
    try:
        await say(js, porch, "hello", {"name": "Porch sensor", "kind": "sensor"})
        await say(js, odd, "hello", {"kind": "not a kind!"})
        entered = await eventually(lambda: _registered(client, porch), timeout=15)
        await say(js, porch, "telemetry", {"temperature_c": 7.5})  # refused: not approved
        await eventually(lambda: _refused_since(js, porch), timeout=15)
        approved = await client.patch(f"{DEVICES}/{porch}", json={"lifecycle": "active"})
        await say(js, porch, "telemetry", {"temperature_c": 8.0})
        applied = await eventually(lambda: _attributes(client, porch, "temperature_c"), timeout=15)
        other = await eventually(lambda: _registered(client, odd), timeout=15)
        waiting = (await client.get(DEVICES, params={"lifecycle": "pending", "limit": 500})).json()
    finally:
        actors.stop()
    assert (entered["lifecycle"], entered["name"], entered["kind"]) == (
        "pending",
        "Porch sensor",
        "sensor",
    )
    assert approved.status_code == 200, approved.text
    assert applied == 8.0  # the reading sent while pending was not applied
    assert (other["name"], other["kind"]) == (odd, "unknown")
    assert odd in [d["id"] for d in waiting["items"]]
    assert porch not in [d["id"] for d in waiting["items"]]  # approved
    audit = await _registry_facts(js, porch)
    assert [(f.change, f.actor) for f in audit][:2] == [
        ("created", "platform:discovery"),
        ("updated", (await client.get("/api/v1/me")).json()["actor"]),
    ]


async def say(js, device_id: str, event_type: str, data: dict) -> None:  # type: ignore[no-untyped-def]
    event = m.make_event(device_id, event_type, data)
    await bus.publish(js, event.nats_subject, event, msg_id=event.id)


async def _registered(client: AsyncTestClient, device_id: str) -> dict | None:
    found = await client.get(f"{DEVICES}/{device_id}")
    return found.json() if found.status_code == 200 else None


async def _attributes(client: AsyncTestClient, device_id: str, key: str):  # type: ignore[no-untyped-def]
    return (await client.get(f"{DEVICES}/{device_id}")).json()["attributes"].get(key)


async def _refused_since(js, device_id: str):  # type: ignore[no-untyped-def]
    facts = await collected(js, subjects.device_rejected(device_id), m.rejected_fact_decoder)
    return [f for f in facts if "approve" in f.reason]


async def _registry_facts(js, device_id: str):  # type: ignore[no-untyped-def]
    return await collected(js, subjects.device_registry(device_id), m.registry_fact_decoder)
