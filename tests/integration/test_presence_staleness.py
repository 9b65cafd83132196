"""Presence you can trust: a device that keeps sending heartbeats but stops reporting an
attribute turns `stale` for it, on the API, in the gauge, and for the rules; it turns fresh
again when it reports. Actors and rules run as processes on the real bus and database."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from libs import bus, subjects
from libs import messages as m
from tests.helpers import eventually, unique_id
from tests.processes import Service


@pytest.fixture(scope="module")
def actors(service_env, data_dir):  # type: ignore[no-untyped-def]
    service = Service("services.actors", service_env, data_dir).start()
    yield service
    assert service.stop() == 0, service.tail()


@pytest.fixture(scope="module")
def rules(service_env, data_dir):  # type: ignore[no-untyped-def]
    service = Service("services.rules", service_env, data_dir).start()
    yield service
    assert service.stop() == 0, service.tail()


async def send(js, device_id: str, event_type: str, data: dict | None = None) -> None:  # type: ignore[no-untyped-def]
    event = m.make_event(device_id, event_type, data)
    await bus.publish(js, event.nats_subject, event, msg_id=event.id)


@contextlib.asynccontextmanager
async def heartbeats(js, device_id: str) -> AsyncIterator[None]:  # type: ignore[no-untyped-def]
    """Heartbeats well inside the tests' 2 s timeout: the device stays online throughout."""

    async def beat() -> None:
        while True:
            await send(js, device_id, "heartbeat")
            await asyncio.sleep(0.3)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def devices_gauge(actors: Service) -> dict[tuple[str, str], float]:
    text = httpx.get(f"http://127.0.0.1:{actors.health_port}/metrics", timeout=5).text
    return {
        (s.labels["connection"], s.labels["lifecycle"]): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "smarthome_devices"
        for s in family.samples
    }


async def runs(js, rule_id: str) -> list[str]:  # type: ignore[no-untyped-def]
    """The kinds of the rule's traces so far, in order (from a replay of the stream)."""
    subject = subjects.rule_fired(rule_id)
    info = await js.stream_info(subjects.stream_of(subject), subjects_filter=subject)
    count = (info.state.subjects or {}).get(subject, 0)
    if not count:
        return []
    sub = await js.subscribe(subject, ordered_consumer=True)
    try:
        return [
            m.rule_fired_decoder.decode((await sub.next_msg(timeout=5)).data).kind
            for _ in range(count)
        ]
    finally:
        await sub.unsubscribe()


async def test_a_meter_that_stops_reporting_power_turns_stale_then_fresh(  # type: ignore[no-untyped-def]
    actors, rules, client, js
) -> None:
    meter = unique_id("meter")
    created = await client.post(
        "/api/v1/devices",
        # Its power every second at most; energy never judged (turned off in the registry).
        json={
            "id": meter,
            "name": "meter",
            "kind": "energy_meter",
            "report_intervals": {"power_w": 1.0, "energy_wh": None},
        },
    )
    assert created.status_code == 201, created.text
    rule = await client.post(
        "/api/v1/rules",
        json={
            "name": "meter stopped reporting",
            "trigger": {
                "type": "state",
                "device_id": meter,
                "attribute": "connection",
                "to": "stale",
            },
            "actions": [{"type": "notify", "message": "meter stopped reporting"}],
        },
    )
    assert rule.status_code == 201, rule.text
    rule_id = rule.json()["id"]

    async def device() -> dict:
        return (await client.get(f"/api/v1/devices/{meter}")).json()

    async with heartbeats(js, meter):
        await send(js, meter, "telemetry", {"power_w": 40.0, "energy_wh": 1.0})
        fresh = await eventually(
            lambda: _where(device(), lambda d: "power_w" in d["reports"]), timeout=10
        )
        assert fresh["reports"]["energy_wh"]["expected_interval_s"] is None

        stale = await eventually(lambda: _where(device(), _stale), timeout=15)
        assert stale["connection"] == "online"
        assert stale["reports"]["power_w"]["expected_interval_s"] == 1.0
        assert stale["reports"]["energy_wh"]["stale"] is False
        assert stale["attributes"]["power_w"] == 40.0  # the last value stays, marked stale
        await eventually(lambda: devices_gauge(actors).get(("stale", "active"), 0) >= 1)
        await eventually(lambda: _eq(runs(js, rule_id), ["fired"]), timeout=15)

        await send(js, meter, "telemetry", {"power_w": 41.0})
        again = await eventually(lambda: _where(device(), lambda d: not _stale(d)), timeout=10)
        assert again["presence"] == "online"
        assert again["reports"]["power_w"]["stale"] is False
        await eventually(lambda: _eq(runs(js, rule_id), ["fired", "cleared"]), timeout=15)


async def test_report_intervals_are_checked_and_changed_in_the_registry(client) -> None:  # type: ignore[no-untyped-def]
    meter = unique_id("meter")
    refused = await client.post(
        "/api/v1/devices",
        json={"id": meter, "name": "m", "kind": "energy_meter", "report_intervals": {"p": 0}},
    )
    assert refused.status_code == 422, refused.text
    assert "report_intervals" in refused.text

    created = await client.post(
        "/api/v1/devices", json={"id": meter, "name": "m", "kind": "sensor"}
    )
    assert created.status_code == 201, created.text
    assert created.json()["report_intervals"] == {}
    assert created.json()["presence"] == "offline"
    changed = await client.patch(
        f"/api/v1/devices/{meter}", json={"report_intervals": {"temperature_c": 600}}
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["report_intervals"] == {"temperature_c": 600.0}


def _stale(device: dict) -> bool:
    power = device["reports"].get("power_w")
    return device["presence"] == "stale" and power is not None and power["stale"]


async def _where(value, check) -> dict | None:  # type: ignore[no-untyped-def]
    found = await value
    return found if check(found) else None


async def _eq(value, expected) -> bool:  # type: ignore[no-untyped-def]
    return (await value) == expected
