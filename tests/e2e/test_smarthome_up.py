"""`smarthome up` as a user runs it: the demo completes, the audit tells the story,
Ctrl-C stops everything, and a second `up` resumes from the same data."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import psutil
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from libs import embedded_nats
from tests.e2e.up import Up
from tests.helpers import eventually

pytestmark = pytest.mark.e2e


@contextlib.contextmanager
def default_mqtt_port_taken() -> Iterator[None]:
    """1883 is in use inside: held here, unless something holds it already (Mosquitto)."""
    with socket.socket() as holder:
        with contextlib.suppress(OSError):
            holder.bind(("127.0.0.1", 1883))
            holder.listen()
        yield


async def banner_line(up: Up, label: str) -> str:
    """The line of `smarthome up`'s banner that starts with `label`."""
    assert up.proc.stdout is not None
    while True:
        line = await asyncio.wait_for(asyncio.to_thread(up.proc.stdout.readline), 60)
        assert line, "stdout closed before the banner"
        if line.decode().strip().startswith(label):
            return line.decode().strip()


def test_explicit_port_in_use_is_a_one_line_error(tmp_path, ports) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        up = Up(tmp_path, port, ports[1])
        code = up.proc.wait(60)
    err = up.stderr.read_text().strip().splitlines()
    assert code == 2
    assert err == [f"smarthome: SMARTHOME_HTTP_PORT={port} is already in use; choose another port"]


def test_explicit_mqtt_port_in_use_is_a_one_line_error(tmp_path, ports, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv("SMARTHOME_MQTT_PORT", str(port))
        up = Up(tmp_path, *ports)
        code = up.proc.wait(60)
    err = up.stderr.read_text().strip().splitlines()
    assert code == 2
    assert err == [f"smarthome: SMARTHOME_MQTT_PORT={port} is already in use; choose another port"]


async def test_first_start_prints_a_generated_password_and_a_second_up_resumes(
    tmp_path, ports
) -> None:  # type: ignore[no-untyped-def]
    """Two `up`s on one data directory (each costs a whole platform: one test): the first
    prints a generated admin password once; the second keeps it, and the data."""
    first = Up(tmp_path, *ports, "--no-demo", admin_password=None)
    try:
        line = await banner_line(first, "First start")
        password = line.split("password ", 1)[1].strip()
        assert first.login("admin", password)
        refused = httpx.get(first.api + "/api/v1/devices", timeout=10)
        assert refused.status_code == 401, refused.text
        first.admin_password = password
        await first.ready()
        r = first.post("/api/v1/devices", {"id": "kept", "name": "K", "kind": "sensor"})
        assert r.status_code == 201, r.text
        event = {
            "id": "e-kept-1",
            "source": "test",
            "type": "telemetry",
            "subject": "kept",
            "specversion": "1.0",
            "data": {"t": 21.5},
        }
        assert first.post("/api/v1/events", event).status_code == 202
        await eventually(lambda: first.get("/api/v1/devices/kept").json()["version"] == 1)
    finally:
        assert first.stop()[0] == 0
    assert password not in first.stderr.read_text()  # shown once, on the terminal only
    second = Up(tmp_path, *ports, "--no-demo", admin_password=None)
    try:
        await banner_line(second, "data")
        assert second.login("admin", password)  # kept; nothing new printed
        second.admin_password = password
        await second.ready()
        kept = second.get("/api/v1/devices/kept").json()
        assert (kept["version"], kept["attributes"]) == (1, {"t": 21.5})
        replay = second.get("/api/v1/events", subject="events.kept.>").json()["items"]
        assert [i["event"]["id"] for i in replay] == ["e-kept-1"]
    finally:
        assert second.stop()[0] == 0


class Started:
    """A `smarthome up` and the banner it printed once ready."""

    def __init__(self, up: Up, data_dir: Path, banner: list[str]) -> None:
        self.up = up
        self.data_dir = data_dir
        self.banner = banner

    def line(self, label: str) -> str:
        (found,) = [line.strip() for line in self.banner if line.strip().startswith(label)]
        return found


@pytest.fixture(scope="module")
async def demo_up(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Started]:
    """One `smarthome up` with the demo, started with MQTT's default port taken, for the
    tests below that only watch it: a platform start costs ~10 s on this 2-core machine.
    The one test that kills a process (and waits for it back) comes last; the stop is
    checked after all of them: clean, nothing left behind, no traceback."""
    data_dir = tmp_path_factory.mktemp("demo-up")
    ports = (embedded_nats.free_port(), embedded_nats.free_port())
    # Each process reports itself every second (5 s by default): a restarted one is listed
    # ready a second after it is, not five.
    with default_mqtt_port_taken():
        up = Up(data_dir, *ports, extra_env={"SMARTHOME_STATUS_INTERVAL_S": "1"})
        try:
            assert up.proc.stdout is not None
            banner: list[str] = []
            while not banner or "Ctrl-C stops everything." not in banner[-1]:
                line = await asyncio.wait_for(asyncio.to_thread(up.proc.stdout.readline), 60)
                assert line, f"stdout closed before the banner: {banner}"
                banner.append(line.decode())
            yield Started(up, data_dir, banner)
        finally:
            code, orphans = up.stop()
    assert code == 0, up.stderr.read_text()[-3000:]
    assert orphans == [], [p.cmdline() for p in orphans]
    assert "Traceback" not in up.stderr.read_text(), up.stderr.read_text()[-3000:]


async def test_demo_turns_the_light_off_and_audit_tells_one_story(demo_up: Started) -> None:
    up = demo_up.up

    def light_off() -> dict | None:
        r = up.get("/api/v1/devices/demo-light")
        light = r.json() if r.status_code == 200 else {}
        # Off because it was turned off, not because it has not reported yet.
        return light if light.get("attributes", {}).get("on") is False else None

    light = await eventually(light_off, timeout=60, interval=0.3)
    assert light["state"] == "off"
    assert light["connection"] == "online"
    runs = await eventually(
        lambda: up.get("/api/v1/rules/demo-light-timeout/runs").json()["items"], timeout=20
    )
    fired = [r for r in runs if r["kind"] == "fired"]
    assert len(fired) == 1, runs
    correlation = fired[0]["correlation_id"]

    def story() -> list[dict]:
        rows = up.get("/api/v1/audit", correlation_id=correlation, limit=100).json()["items"]
        actions = {(r["action"], r["device_id"], r["result"]) for r in rows}
        wanted = {
            ("rule.fired", "demo-meter", "ok"),
            ("command.sent", "demo-light", "pending"),
            ("device.command_status", "demo-light", "done"),
            ("state.changed", "demo-light", "active->off (online)"),
            ("state.changed", "demo-meter", "active->triggered (online)"),
        }
        assert wanted <= actions, f"missing {wanted - actions} in {sorted(actions)}"
        return rows

    rows = await eventually(story, timeout=20, interval=0.3)
    assert {r["correlation_id"] for r in rows} == {correlation}, rows
    # Once the light is off the meter reads 0 W: the episode ends and the mark clears.
    meter = await eventually(
        lambda: (d := up.get("/api/v1/devices/demo-meter").json())["state"] == "off" and d,
        timeout=20,
    )
    assert meter["attributes"]["power_w"] == 0


async def test_a_taken_default_mqtt_port_is_replaced_by_a_free_one_and_printed(
    demo_up: Started,
) -> None:
    printed = demo_up.line("MQTT")
    port = int(printed.rpartition(":")[2])
    assert printed == f"MQTT      mqtt://127.0.0.1:{port}" and port != 1883
    replaced = f"port 1883 (SMARTHOME_MQTT_PORT default) is taken; using {port}"
    assert replaced in demo_up.up.stderr.read_text()
    device = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    answers: list[str] = []
    device.on_connect = lambda _c, _u, _f, code, _p: answers.append(str(code))
    device.connect("127.0.0.1", port)
    device.loop_start()
    try:
        # An MQTT server answers there, and refuses a device without credentials.
        assert await eventually(lambda: answers) == ["Not authorized"]
    finally:
        device.disconnect()
        device.loop_stop()


SERVICES = {"busauth", "gateway", "actors", "rules", "recorder", "webhooks"}


def printed_metrics(banner: list[str]) -> dict[str, str]:
    """The banner's `metrics` lines: each service's name and the address of its /metrics."""
    found: dict[str, str] = {}
    for line in banner:
        if match := re.match(r"\s*(?:metrics\s+)?(\w+)\s+(http://\S+/metrics)", line):
            found[match[1]] = match[2]
    return found


async def test_every_process_serves_metrics_reports_its_status_and_is_restarted_if_killed(
    demo_up: Started,
) -> None:
    up = demo_up.up
    printed = printed_metrics(demo_up.banner)
    assert set(printed) == SERVICES, printed

    def parsed(name: str) -> set[str]:
        headers = up.headers if name == "gateway" else {}  # the gateway's asks for a token
        try:
            page = httpx.get(printed[name], headers=headers, timeout=10)
        except httpx.TransportError as exc:
            raise AssertionError(f"{name}: {exc!r}") from exc
        assert page.status_code == 200, (name, page.status_code)
        return {family.name for family in text_string_to_metric_families(page.text)}

    # The banner waits for the gateway only: a worker may still be importing (slow on a
    # loaded 2-core machine) and serves its port once connected to the bus.
    for name in SERVICES:
        assert await eventually(lambda n=name: parsed(n), timeout=60), name

    def all_ready() -> dict[str, dict]:
        answer = up.get("/api/v1/system/services")
        assert answer.status_code == 200, answer.text  # a 503: the bus slow to answer now
        items = answer.json()["items"]
        listed = {i["name"]: i for i in items}
        assert set(listed) == SERVICES and all(i["ready"] for i in items), items
        return listed

    listed = await eventually(all_ready, timeout=60, interval=0.5)
    assert {n: i["metrics_url"] for n, i in listed.items()} == printed
    assert {i["restarts"] for i in listed.values()} == {0}

    installer = json.loads((demo_up.data_dir / "api-keys.json").read_text())["demo-devices"]
    refused = httpx.get(
        up.api + "/api/v1/system/services",
        headers={"Authorization": f"Bearer {installer}"},
        timeout=10,
    )
    assert refused.status_code == 403, refused.text

    # On SQLite (the embedded default, here) every service runs at `up`'s priority: the
    # recorder yields the CPU (SMARTHOME_BACKGROUND_NICE) on Postgres only, where it holds no
    # lock that the live path's writes wait on.
    launcher = psutil.Process(up.proc.pid)
    niceness = {
        p.cmdline()[-1].removeprefix("services."): p.nice()
        for p in launcher.children()
        if p.cmdline()[-1].startswith("services.")
    }
    assert set(niceness) == SERVICES, niceness
    assert set(niceness.values()) == {launcher.nice()}, niceness

    (actors,) = [
        p
        for p in psutil.Process(up.proc.pid).children()
        if "services.actors" in " ".join(p.cmdline())
    ]
    actors.kill()

    def restarted_and_ready() -> dict:
        answer = up.get("/api/v1/system/services")
        assert answer.status_code == 200, answer.text  # a 503: the bus slow to answer now
        items = answer.json()["items"]
        again = [i for i in items if i["name"] == "actors" and i["restarts"] >= 1]
        assert again and again[0]["ready"], items
        return again[0]

    back = await eventually(restarted_and_ready, timeout=60, interval=0.5)
    assert back["state"] == "ready" and back["metrics_url"] == printed["actors"]
    log = up.stderr.read_text()
    assert "actors exited with code -9; restarting" in log, log[-2000:]
    assert any(
        "services.actors" in " ".join(p.cmdline()) and p.pid != actors.pid
        for p in psutil.Process(up.proc.pid).children()
    )
