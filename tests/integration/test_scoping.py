"""Roles and homes on every domain route: what a resident or an installer of one home may do,
and what it sees (HTTP, the event replay, SSE, WebSocket, webhooks, the audit log).

Two homes, A and B, each with a light; the principals are API keys of the roles (`make_token`).
The gateway runs under a real uvicorn server (live streams need one); the recorder and the
webhooks service run as processes where a test needs them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import msgspec
import pytest
import uvicorn
from litestar import Litestar
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from websockets.asyncio.client import connect

from libs import embedded_nats, homes, subjects, webhooks
from libs import messages as m
from libs.principals import Principal, PrincipalKind, Role
from libs.settings import Settings
from services.gateway import scope
from services.gateway.app import create_app
from services.gateway.auth.context import Context
from services.gateway.subscriptions.schemas import SubscriptionCreate
from services.gateway.subscriptions.service import SubscriptionService
from tests.api import bearer
from tests.helpers import eventually, unique_id
from tests.integration.test_gateway_rules_dryrun import record
from tests.integration.test_gateway_sse import following
from tests.integration.test_moved_device_privacy import home_since
from tests.integration.test_rules import collected, report
from tests.integration.webhooks_support import Receiver, webhooks_service
from tests.processes import Service

API = "/api/v1"
DEVICES = f"{API}/devices"
RULES = f"{API}/rules"
SUBS = f"{API}/subscriptions"
EVENTS = f"{API}/events"
AUDIT = f"{API}/audit"
READ_TIMEOUT_S = 10.0
# Any light drawing power: a selector without a location (a homed rule looks in its home).
LIGHTS_ON = {"type": "threshold", "selector": {"kind": "light"}, "attribute": "power_w", "above": 1}


@dataclass
class World:
    """Homes A and B with a light each, and a client per principal."""

    home_a: str
    home_b: str
    lamp_a: str
    lamp_b: str
    admin: httpx.AsyncClient
    resident: httpx.AsyncClient  # of home A
    installer: httpx.AsyncClient  # of home A
    ws_url: str
    resident_token: str
    app: Litestar

    def home_of(self, device_id: str) -> str:
        return {self.lamp_a: self.home_a, self.lamp_b: self.home_b}[device_id]


@pytest.fixture(scope="module")
async def world(settings: Settings, admin_token: str, make_token: Any) -> AsyncIterator[World]:
    home_a, home_b = unique_id("home"), unique_id("home")
    resident = await make_token(Role.RESIDENT, [home_a])
    installer = await make_token(Role.INSTALLER, [home_a])
    # An administrator may point a webhook at loopback inside the allow-nets.
    app = create_app(dataclasses.replace(settings, webhook_allow_nets=("127.0.0.0/8",)))
    port = embedded_nats.free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
    server = uvicorn.Server(config)
    running = asyncio.create_task(server.serve())
    await eventually(lambda: server.started)
    base = f"http://127.0.0.1:{port}"

    def client(token: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=base, timeout=10, headers=bearer(token))

    try:
        async with client(admin_token) as a, client(resident) as r, client(installer) as i:
            lamps = []
            for home in (home_a, home_b):
                lamp = {"id": unique_id("lamp"), "name": "Lamp", "kind": "light"}
                created = await a.post(DEVICES, json=lamp | {"location": f"{home}/living"})
                assert created.status_code == 201, created.text
                lamps.append(lamp["id"])
            lamp_a, lamp_b = lamps
            yield World(
                home_a,
                home_b,
                lamp_a,
                lamp_b,
                admin=a,
                resident=r,
                installer=i,
                ws_url=f"ws://127.0.0.1:{port}{EVENTS}/ws",
                resident_token=resident,
                app=app,
            )
    finally:
        server.should_exit = True
        await running


def rule(device_id: str, **changes: Any) -> dict[str, Any]:
    return {
        "id": unique_id("rule"),
        "name": "Light on too long",
        "trigger": {
            "type": "threshold",
            "device_id": device_id,
            "attribute": "power_w",
            "above": 1,
        },
        "actions": [{"type": "command", "device_id": device_id, "action": "turn_off"}],
    } | changes


def field_of(answer: httpx.Response) -> str:
    return str(answer.json()["errors"][0]["field"])


def telemetry(device_id: str, event_type: str = "telemetry") -> dict[str, Any]:
    return msgspec.to_builtins(m.make_event(device_id, event_type, {"power_w": 1.0}))


async def actor_of(client: httpx.AsyncClient) -> str:
    return str((await client.get(f"{API}/me")).json()["actor"])


# --- another home's objects: 404 ------------------------------------------------------------


async def test_another_homes_objects_answer_a_resident_404_like_missing_ones(
    world: World,
) -> None:
    r, admin, lamp_b = world.resident, world.admin, world.lamp_b
    rule_b = (await admin.post(RULES, json=rule(lamp_b, home=world.home_b))).json()
    sub_b = (
        await admin.post(
            SUBS, json={"filter": "events.>", "url": "http://127.0.0.1:9/", "home": world.home_b}
        )
    ).json()
    command_b = (
        await admin.post(f"{DEVICES}/{lamp_b}/commands", json={"action": "turn_on"})
    ).json()
    await admin.post(f"{API}/locations", json={"id": world.home_b, "name": "B", "kind": "home"})
    window = {"since": (m.now() - timedelta(hours=1)).isoformat(), "until": m.now().isoformat()}
    try:
        answers = {
            "device": await r.get(f"{DEVICES}/{lamp_b}"),
            "history": await r.get(f"{DEVICES}/{lamp_b}/history"),
            "statistics": await r.get(f"{DEVICES}/{lamp_b}/statistics"),
            "command": await r.post(f"{DEVICES}/{lamp_b}/commands", json={"action": "turn_on"}),
            "command status": await r.get(f"{DEVICES}/{lamp_b}/commands/{command_b['id']}"),
            "audit": await r.get(AUDIT, params={"device_id": lamp_b}),
            "rule": await r.get(f"{RULES}/{rule_b['id']}"),
            "rule runs": await r.get(f"{RULES}/{rule_b['id']}/runs"),
            "rule dry run": await r.post(f"{RULES}/{rule_b['id']}/test", json=window),
            "rule change": await r.put(
                f"{RULES}/{rule_b['id']}", json=rule(lamp_b, id=rule_b["id"])
            ),
            "rule deletion": await r.delete(f"{RULES}/{rule_b['id']}"),
            "subscription": await r.get(f"{SUBS}/{sub_b['id']}"),
            "deliveries": await r.get(f"{SUBS}/{sub_b['id']}/deliveries"),
            "subscription deletion": await r.delete(f"{SUBS}/{sub_b['id']}"),
            "location": await r.get(f"{API}/locations/{world.home_b}"),
        }
        missing = await r.get(f"{DEVICES}/{lamp_b}-missing")
        own = await r.get(f"{DEVICES}/{world.lamp_a}")
        listed = [d["id"] for d in (await r.get(DEVICES, params={"limit": 500})).json()["items"]]
        rules = [x["id"] for x in (await r.get(RULES, params={"limit": 500})).json()["items"]]
        subs = [x["id"] for x in (await r.get(SUBS, params={"limit": 500})).json()["items"]]
        still = await admin.get(f"{RULES}/{rule_b['id']}")
        home_b = await admin.get(f"{API}/locations/{world.home_b}")
    finally:
        await admin.delete(f"{RULES}/{rule_b['id']}")
        await admin.delete(f"{SUBS}/{sub_b['id']}")

    assert {what: a.status_code for what, a in answers.items()} == dict.fromkeys(answers, 404)
    # In the words a device that does not exist gets: nothing tells the two apart.
    assert answers["device"].json()["detail"] == missing.json()["detail"].replace(
        f"{lamp_b}-missing", lamp_b
    )
    assert own.status_code == 200
    assert world.lamp_a in listed and lamp_b not in listed
    assert rule_b["id"] not in rules and sub_b["id"] not in subs
    assert still.status_code == 200  # the refused change and deletion changed nothing
    assert (still.json()["version"], home_b.status_code) == (1, 200)


# --- what a role may never do: 403 ------------------------------------------------------------


async def test_a_role_without_the_permission_is_refused_403(world: World) -> None:
    r, i, lamp_a = world.resident, world.installer, world.lamp_a
    answers = {
        "resident approves": await r.patch(f"{DEVICES}/{lamp_a}", json={"lifecycle": "active"}),
        "resident deletes a device": await r.delete(f"{DEVICES}/{lamp_a}"),
        "resident registers a device": await r.post(
            DEVICES, json={"name": "x", "kind": "light", "location": f"{world.home_a}/x"}
        ),
        "resident disconnects": await r.post(f"{DEVICES}/{lamp_a}/disconnect"),
        "resident lists users": await r.get(f"{API}/users"),
        "resident lists API keys": await r.get(f"{API}/api-keys"),
        "resident publishes": await r.post(EVENTS, json=telemetry(lamp_a)),
        "resident defines a home": await r.post(
            f"{API}/locations", json={"name": "Attic", "kind": "home", "id": world.home_a}
        ),
        "installer commands": await i.post(
            f"{DEVICES}/{lamp_a}/commands", json={"action": "turn_on"}
        ),
        "installer writes a rule": await i.post(RULES, json=rule(lamp_a)),
        "installer lists webhooks": await i.get(SUBS),
    }

    assert {what: a.status_code for what, a in answers.items()} == dict.fromkeys(answers, 403)
    assert (await r.get(f"{DEVICES}/{lamp_a}")).json()["enabled"] is True  # nothing changed


async def test_an_installer_manages_the_devices_of_its_homes_only(world: World) -> None:
    i, device_id = world.installer, unique_id("sensor")
    body = {"id": device_id, "name": "Hall sensor", "kind": "sensor"}

    homeless = await i.post(DEVICES, json=body)
    elsewhere = await i.post(DEVICES, json=body | {"location": f"{world.home_b}/hall"})
    created = await i.post(DEVICES, json=body | {"location": f"{world.home_a}/hall"})
    moved_away = await i.patch(f"{DEVICES}/{device_id}", json={"location": f"{world.home_b}/x"})
    decommissioned = await i.patch(f"{DEVICES}/{device_id}", json={"lifecycle": "decommissioned"})
    other = await i.patch(f"{DEVICES}/{world.lamp_b}", json={"name": "Mine now"})
    published = await i.post(EVENTS, json=[telemetry(device_id), telemetry(world.lamp_b)])
    deleted = await i.delete(f"{DEVICES}/{device_id}")

    assert (homeless.status_code, field_of(homeless)) == (422, "$.location")
    assert (elsewhere.status_code, field_of(elsewhere)) == (422, "$.location")
    assert created.status_code == 201, created.text
    assert (moved_away.status_code, field_of(moved_away)) == (422, "$.location")
    assert decommissioned.json()["lifecycle"] == "decommissioned"
    assert other.status_code == 404
    assert published.status_code == 404  # one of the batch is another home's: none goes
    assert deleted.status_code == 204


# --- rules stay in their home -----------------------------------------------------------------


async def test_a_residents_rule_into_another_home_is_refused_and_nothing_changes(
    world: World,
) -> None:
    r, lamp_a, lamp_b = world.resident, world.lamp_a, world.lamp_b
    spec = rule(lamp_a)  # no `home`: its only one
    created = await r.post(RULES, json=spec)
    into_b = rule(lamp_a, actions=[{"type": "command", "device_id": lamp_b, "action": "turn_off"}])
    refused = {
        "action": await r.post(RULES, json=into_b),
        "home": await r.post(RULES, json=rule(lamp_a, home=world.home_b)),
        "trigger": await r.post(RULES, json=rule(lamp_b) | {"actions": spec["actions"]}),
        "condition": await r.put(
            f"{RULES}/{spec['id']}",
            json=spec | {"conditions": [{"type": "state", "device_id": lamp_b, "state": "off"}]},
        ),
        "selector": await r.post(
            RULES,
            json=rule(lamp_a)
            | {
                "trigger": {
                    "type": "threshold",
                    "selector": {"location": f"{world.home_b}/living"},
                    "attribute": "power_w",
                    "above": 1,
                }
            },
        ),
        "event": await r.post(
            RULES,
            json=rule(lamp_a)
            | {"trigger": {"type": "event", "subject": f"events.{lamp_b}.button"}},
        ),
        "dry run": await r.post(
            f"{RULES}/test",
            json={
                "rule": into_b,
                "since": (m.now() - timedelta(hours=1)).isoformat(),
                "until": m.now().isoformat(),
            },
        ),
    }
    after = await r.get(f"{RULES}/{spec['id']}")
    never_made = await world.admin.get(f"{RULES}/{into_b['id']}")
    await r.delete(f"{RULES}/{spec['id']}")

    assert created.status_code == 201, created.text
    assert created.json()["home"] == world.home_a
    assert {what: (a.status_code, field_of(a)) for what, a in refused.items()} == {
        "action": (422, "$.actions[0].device_id"),
        "home": (422, "$.home"),
        "trigger": (422, "$.trigger.device_id"),
        "condition": (422, "$.conditions[0].device_id"),
        "selector": (422, "$.trigger.selector.location"),
        "event": (422, "$.trigger.subject"),
        "dry run": (422, "$.rule.actions[0].device_id"),
    }
    assert (after.json()["version"], after.json()["conditions"]) == (1, [])
    assert never_made.status_code == 404


async def test_a_homed_rule_neither_hears_nor_acts_beyond_its_home(
    world: World,
    js: JetStreamContext,
    service_env: dict[str, str],
    data_dir: Any,
) -> None:
    r = world.resident
    notify = [{"type": "notify", "message": "a light is on"}]
    lights = rule(world.lamp_a, actions=notify) | {"trigger": LIGHTS_ON}
    buttons = rule(world.lamp_a, actions=notify) | {
        "trigger": {"type": "event", "subject": "events.*.button"}
    }
    assert (await r.post(RULES, json=lights)).status_code == 201
    assert (await r.post(RULES, json=buttons)).status_code == 201
    rules = Service("services.rules", service_env, data_dir)
    await asyncio.to_thread(rules.start)
    try:
        await eventually(lambda: "reading events on" in rules.tail(100_000), timeout=15)
        for lamp in (world.lamp_b, world.lamp_a):  # home B's first: evaluated first
            await report(js, lamp, 60.0, 1)
            assert (await world.admin.post(EVENTS, json=telemetry(lamp, "button"))).is_success
        fired = {
            name: await eventually(
                lambda spec=spec: collected(
                    js, subjects.rule_fired(spec["id"]), m.rule_fired_decoder
                ),
                timeout=20,
            )
            for name, spec in (("lights", lights), ("buttons", buttons))
        }
    finally:
        await asyncio.to_thread(rules.stop)
        for spec in (lights, buttons):
            await r.delete(f"{RULES}/{spec['id']}")

    assert {name: [(f.kind, f.device_id) for f in runs] for name, runs in fired.items()} == {
        "lights": [("fired", world.lamp_a)],
        "buttons": [("fired", world.lamp_a)],
    }
    assert {f.home for runs in fired.values() for f in runs} == {world.home_a}


async def test_a_homed_rules_dry_run_reads_only_its_homes_history(
    world: World, sessions: async_sessionmaker[AsyncSession]
) -> None:
    # Recorded since the lamps came to their homes: a homed rule replays nothing from before.
    came = [await home_since(sessions, lamp) for lamp in (world.lamp_a, world.lamp_b)]
    assert None not in came
    start = max(t for t in came if t is not None)
    await record(sessions, world.lamp_b, [(start, {"power_w": 60.0})])
    await record(sessions, world.lamp_a, [(m.now(), {"power_w": 60.0})])
    body = {
        "rule": rule(world.lamp_a, actions=[{"type": "notify", "message": "on"}])
        | {"trigger": LIGHTS_ON},
        "since": (start - timedelta(minutes=1)).isoformat(),
        "until": m.now().isoformat(),
    }

    resident = await world.resident.post(f"{RULES}/test", json=body)
    home_b = await world.admin.post(
        f"{RULES}/test", json=body | {"rule": body["rule"] | {"home": world.home_b}}
    )

    assert resident.status_code == 200, resident.text
    assert [f["device_id"] for f in resident.json()["firings"]] == [world.lamp_a]
    assert [f["device_id"] for f in home_b.json()["firings"]] == [world.lamp_b]


# --- live messages ------------------------------------------------------------------------------


def device_of(subject: str) -> str:
    """The device a subject of these tests is about."""
    return subject.split(".")[2 if subject.startswith("system.device.") else 1]


async def mixed_traffic(world: World, marker: str) -> str:
    """Events, commands and registry changes of both homes' lights, in turns, then a rule
    change in each home; returns the id of home A's rule (the last message)."""
    admin = world.admin
    for lamp in (world.lamp_b, world.lamp_a, world.lamp_b, world.lamp_a):
        assert (await admin.post(EVENTS, json=telemetry(lamp))).status_code == 202
        assert (
            await admin.post(f"{DEVICES}/{lamp}/commands", json={"action": "turn_on"})
        ).is_success
    for lamp in (world.lamp_b, world.lamp_a):
        await admin.post(f"{DEVICES}/{lamp}/disconnect")
        await admin.post(f"{DEVICES}/{lamp}/connect")
    rule_b = await admin.post(RULES, json=rule(world.lamp_b, home=world.home_b))
    rule_a = await admin.post(RULES, json=rule(world.lamp_a, home=world.home_a))
    assert rule_b.is_success and rule_a.is_success
    assert (await admin.post(EVENTS, json=telemetry(world.lamp_a, marker))).status_code == 202
    return str(rule_a.json()["id"])


def only_home_a(world: World, seen: list[str], rule_a: str) -> None:
    """Nothing of home B's in what home A's resident got of `mixed_traffic`."""
    about_rules = {s for s in seen if s.startswith("system.rule.")}
    about_devices = {device_of(s) for s in seen if not s.startswith("system.rule.")}
    assert about_devices <= {world.lamp_a}, seen
    assert about_rules <= {subjects.rule_changed(rule_a)}, seen


async def test_a_residents_replay_holds_only_its_homes_messages(
    world: World, js: JetStreamContext
) -> None:
    starts = {
        s: (await js.stream_info(s)).state.last_seq
        for s in (subjects.EVENTS_STREAM, subjects.COMMANDS_STREAM, subjects.SYSTEM_STREAM)
    }
    rule_a = await mixed_traffic(world, marker=unique_id("marker"))

    async def replayed(client: httpx.AsyncClient, subject: str, stream: str) -> list[str]:
        seen: list[str] = []
        params: dict[str, Any] = {"subject": subject, "since_seq": starts[stream], "limit": 3}
        while True:  # small pages: the cursor walks past what is not for this reader
            page = (await client.get(EVENTS, params=params)).json()
            seen += [item["subject"] for item in page["items"]]
            if not page["next_cursor"]:
                return seen
            params = {"subject": subject, "cursor": page["next_cursor"], "limit": 3}

    resident = [
        *await replayed(world.resident, "events.>", subjects.EVENTS_STREAM),
        *await replayed(world.resident, "commands.>", subjects.COMMANDS_STREAM),
        *await replayed(world.resident, "system.>", subjects.SYSTEM_STREAM),
    ]
    admin = await replayed(world.admin, "events.>", subjects.EVENTS_STREAM)
    dead = (await world.resident.get(EVENTS, params={"subject": "deadletter.>"})).json()

    only_home_a(world, resident, rule_a)
    assert len([s for s in resident if s.startswith("events.")]) == 3  # two readings, the marker
    assert [s for s in resident if s.startswith("commands.")] == [
        subjects.commands(world.lamp_a)
    ] * 2
    assert [s for s in resident if s.startswith("system.")] == [
        subjects.device_registry(world.lamp_a),
        subjects.device_registry(world.lamp_a),
        subjects.rule_changed(rule_a),
    ]
    assert {device_of(s) for s in admin} == {world.lamp_a, world.lamp_b}  # the mix was there
    assert dead["items"] == []


async def test_a_residents_live_streams_carry_only_its_homes_messages(world: World) -> None:
    marker = unique_id("marker")
    frames: dict[str, list[str]] = {"sse-events": [], "sse-system": [], "ws": []}
    end_of_system = "system.rule."  # the last message of the mix is home A's rule change

    async def sse(name: str, subject: str, last: str) -> None:
        async with following(world.resident, {"subject": subject}) as stream:
            ready[name].set()
            while True:
                frame = await stream.next_event()
                assert frame.event is not None
                frames[name].append(frame.event)
                if frame.event.startswith(last):
                    return

    async def ws() -> None:
        async with connect(
            world.ws_url,
            proxy=None,
            open_timeout=5,
            additional_headers=bearer(world.resident_token),
        ) as socket:
            for sub_id, subject in (("e", "events.>"), ("s", "system.>")):
                await socket.send(
                    json.dumps({"type": "subscribe", "id": sub_id, "subject": subject})
                )
                assert json.loads(await socket.recv())["type"] == "subscribed"
            ready["ws"].set()
            done: set[str] = set()
            async with asyncio.timeout(READ_TIMEOUT_S):
                while done != {"e", "s"}:
                    frame = json.loads(await socket.recv())
                    if frame["type"] != "event":
                        continue
                    frames["ws"].append(frame["subject"])
                    subject = frame["subject"]
                    if subject.endswith(f".{marker}") or subject.startswith(end_of_system):
                        done.add(frame["id"])

    ready = {name: asyncio.Event() for name in frames}
    readers = [
        asyncio.create_task(sse("sse-events", "events.>", f"events.{world.lamp_a}.{marker}")),
        asyncio.create_task(sse("sse-system", "system.>", end_of_system)),
        asyncio.create_task(ws()),
    ]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready.values())), READ_TIMEOUT_S)
    rule_a = await mixed_traffic(world, marker)
    await asyncio.wait_for(asyncio.gather(*readers), READ_TIMEOUT_S * 2)

    for seen in frames.values():
        only_home_a(world, seen, rule_a)
    readings = [f"events.{world.lamp_a}.telemetry"] * 2 + [f"events.{world.lamp_a}.{marker}"]
    system = [subjects.device_registry(world.lamp_a)] * 2 + [subjects.rule_changed(rule_a)]
    assert frames["sse-events"] == readings
    assert frames["sse-system"] == system
    assert sorted(frames["ws"]) == sorted(readings + system)


async def test_a_residents_live_stream_does_not_lose_what_its_home_index_learns_late(
    world: World, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """The gateway learns an object's home from the object's fact on core NATS, which may
    come after that fact (or the object's first event) on a live stream. Here the index hears
    nothing while new objects of both homes appear: the resident still gets what is its
    home's (the fact's own home, the database's), and nothing of the other home."""
    admin = world.admin
    async with (
        following(world.resident, {"subject": "system.>"}) as system,
        following(world.resident, {"subject": "events.>"}) as events,
    ):
        index = world.app.state[scope.HOME_INDEX].index  # started by a resident's stream
        # No reload in flight (opening a stream starts one when the index is stale), then
        # deaf: the index learns nothing until the end but what the feeds ask of it.
        await eventually(lambda: time.monotonic() - index.loaded_at < homes.RELOAD_EVERY_S)
        await index.stop()
        try:
            lamps = {}
            for home in (world.home_b, world.home_a):
                # The home itself: a location of it whether or not earlier tests defined it.
                lamp = {"id": unique_id("lamp"), "name": "Lamp", "kind": "light", "location": home}
                created = await admin.post(DEVICES, json=lamp)
                assert created.status_code == 201, created.text
                lamps[home] = lamp["id"]
            lamp_a, lamp_b = lamps[world.home_a], lamps[world.home_b]
            assert not index.knows(f"events.{lamp_a}.telemetry")
            for lamp_id in (lamp_b, lamp_a):
                assert (await admin.post(EVENTS, json=telemetry(lamp_id))).status_code == 202
            rule_b = await admin.post(RULES, json=rule(lamp_b, home=world.home_b))
            rule_a = await admin.post(RULES, json=rule(lamp_a, home=world.home_a))
            assert rule_b.is_success and rule_a.is_success
            assert not index.knows(subjects.rule_changed(rule_a.json()["id"]))
            async with asyncio.timeout(READ_TIMEOUT_S):
                system_seen = [(await system.next_event()).event for _ in range(2)]
                events_seen = [(await events.next_event()).event]
        finally:
            assert index.nc is not None
            await index.start(index.nc, sessions)

    # Home B's were published first: any of them would come before these.
    assert system_seen == [
        subjects.device_registry(lamp_a),
        subjects.rule_changed(rule_a.json()["id"]),
    ]
    assert events_seen == [f"events.{lamp_a}.telemetry"]


async def test_a_residents_webhook_gets_only_its_homes_events(
    world: World,
    sessions: async_sessionmaker[AsyncSession],
    nc: NATS,
    service_env: dict[str, str],
    data_dir: Any,
) -> None:
    key_id = (await actor_of(world.resident)).removeprefix("apikey:")
    resident = Principal(PrincipalKind.API_KEY, key_id, Role.RESIDENT, frozenset({world.home_a}))
    hooks = webhooks.WebhookSettings(allow_nets=webhooks.allow_nets(["127.0.0.0/8"]))
    service = SubscriptionService(sessions, nc, hooks)
    marker = unique_id("marker")
    async with Receiver() as receiver, webhooks_service(service_env, data_dir):
        # Made through the service: only an administrator's webhook may reach loopback.
        created = await service.create(
            SubscriptionCreate(filter="events.>", url=receiver.url),
            Context(resident, unique_id("corr")),
            admin=True,
        )
        try:
            for lamp in (world.lamp_b, world.lamp_a, world.lamp_b):
                assert (await world.admin.post(EVENTS, json=telemetry(lamp))).status_code == 202
            await world.admin.post(EVENTS, json=telemetry(world.lamp_a, marker))

            def bodies() -> list[dict[str, Any]]:
                return [json.loads(r.body) for r in receiver.delivered]

            await eventually(lambda: any(b["type"] == marker for b in bodies()), timeout=20)
        finally:
            await service.delete(created.id, Context(resident, unique_id("corr")))

    assert created.home == world.home_a
    assert [(b["subject"], b["type"]) for b in bodies()] == [
        (world.lamp_a, "telemetry"),
        (world.lamp_a, marker),
    ]


# --- the audit log ------------------------------------------------------------------------------


async def test_every_write_is_audited_under_its_principal_and_a_resident_reads_its_homes(
    world: World, service_env: dict[str, str], data_dir: Any
) -> None:
    corr = {"X-Correlation-Id": unique_id("corr")}
    r, i, admin = world.resident, world.installer, world.admin
    sensor = unique_id("sensor")
    spec_a, spec_b = rule(world.lamp_a), rule(world.lamp_b, home=world.home_b)
    writes = [
        await r.post(RULES, json=spec_a, headers=corr),
        await r.post(
            f"{DEVICES}/{world.lamp_a}/commands", json={"action": "turn_on"}, headers=corr
        ),
        await i.post(
            DEVICES,
            json={
                "id": sensor,
                "name": "Sensor",
                "kind": "sensor",
                "location": f"{world.home_a}/x",
            },
            headers=corr,
        ),
        await i.patch(f"{DEVICES}/{sensor}", json={"name": "Hall sensor"}, headers=corr),
        await i.post(f"{DEVICES}/{sensor}/disconnect", headers=corr),
        await admin.post(RULES, json=spec_b, headers=corr),
    ]
    assert all(w.is_success for w in writes), [w.text for w in writes]
    recorder = Service("services.recorder", service_env, data_dir)
    await asyncio.to_thread(recorder.start)
    try:

        async def audited(client: httpx.AsyncClient) -> list[dict[str, Any]]:
            params = {"correlation_id": corr["X-Correlation-Id"], "limit": 100}
            return list((await client.get(AUDIT, params=params)).json()["items"])

        everything = await eventually(lambda: _at_least(audited(admin), 6), timeout=30)
        resident_view = await audited(r)
    finally:
        await asyncio.to_thread(recorder.stop)
        await r.delete(f"{RULES}/{spec_a['id']}")
        await admin.delete(f"{RULES}/{spec_b['id']}")

    actors = {
        "resident": await actor_of(r),
        "installer": await actor_of(i),
        "admin": await actor_of(admin),
    }
    assert sorted((e["action"], e["actor"]) for e in everything) == sorted(
        [
            ("rule.created", actors["resident"]),
            ("command.sent", actors["resident"]),
            ("device.created", actors["installer"]),
            ("device.updated", actors["installer"]),
            ("device.disconnected", actors["installer"]),
            ("rule.created", actors["admin"]),
        ]
    )
    assert all(a.startswith("apikey:") for a in actors.values())
    # Home A's resident: its rule, its light's command, the installer's sensor; not home B's rule.
    assert sorted(e["action"] for e in resident_view) == sorted(
        ["rule.created", "command.sent", "device.created", "device.updated", "device.disconnected"]
    )
    assert {e["detail"].get("id") for e in resident_view if e["action"] == "rule.created"} == {
        spec_a["id"]
    }


async def _at_least(items: Any, n: int) -> list[dict[str, Any]] | None:
    found = await items
    return found if len(found) >= n else None
