"""The operator CLI (`smarthome devices ls`, ...) as an operator runs it, against a real
gateway served by uvicorn: it knows the gateway only by its HTTP API.

Commands run in a thread through Typer's test runner (the gateway answers on the test's event
loop meanwhile); what must be seen as a process (an endless tail, the entry point, stderr
without a traceback) runs as a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.js import JetStreamContext
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from typer.testing import CliRunner, Result

from libs import embedded_nats, service_status
from libs import messages as m
from libs.db.models import AuditEntry
from libs.settings import Settings
from services.ctl.app import build
from services.gateway.app import create_app
from tests.helpers import unique_id
from tests.integration.test_gateway_ws import Gateway, serving
from tests.proxy import Relay

PASSWORD = "operator-password-1"
LINE_TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
async def gateway(settings: Settings, admin_token: str) -> AsyncIterator[Gateway]:
    async with serving(create_app(settings), admin_token) as running:
        yield running


@pytest.fixture(scope="module")
def url(gateway: Gateway) -> str:
    return str(gateway.http.base_url).rstrip("/")


@pytest.fixture(scope="module")
async def operator(gateway: Gateway) -> str:
    """A person who signs in with a password (an administrator)."""
    username = unique_id("operator")
    body = {"username": username, "password": PASSWORD, "role": "admin"}
    r = await gateway.http.post("/api/v1/users", json=body)
    assert r.status_code == 201, r.text
    return username


class Cli:
    """`smarthome ...` with a config dir of its own and nothing from the environment."""

    def __init__(self, config_home: Path) -> None:
        self.config_home = config_home
        self.env: dict[str, str | None] = {
            "XDG_CONFIG_HOME": str(config_home),
            "SMARTHOME_URL": None,
            "SMARTHOME_TOKEN": None,
            "COLUMNS": "200",
        }

    @property
    def credentials(self) -> Path:
        return self.config_home / "smarthome" / "credentials.json"

    async def __call__(self, *args: str, input: str | None = None, **env: str) -> Result:
        runner = CliRunner()
        return await asyncio.to_thread(
            runner.invoke, build(), list(args), input=input, env={**self.env, **env}
        )

    async def json(self, *args: str) -> Any:
        result = await self(*args, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    def process_env(self, **env: str) -> dict[str, str]:
        merged = {**os.environ, **{k: v for k, v in self.env.items() if v is not None}, **env}
        for name in ("SMARTHOME_URL", "SMARTHOME_TOKEN"):
            if name not in env:
                merged.pop(name, None)
        return merged


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path / "config")


@pytest.fixture
async def operator_cli(cli: Cli, url: str, operator: str) -> Cli:
    """Logged in as the operator, as `smarthome login` does it."""
    result = await cli("login", url, "--user", operator, "--password-stdin", input=PASSWORD)
    assert result.exit_code == 0, result.output
    return cli


async def run(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """The entry point as a process: exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


async def test_login_keeps_the_tokens_readable_by_their_owner_only(
    cli: Cli, url: str, operator: str
) -> None:
    result = await cli(
        "login", url + "/api/v1", "--user", operator, "--password-stdin", input=PASSWORD
    )

    assert result.exit_code == 0, result.output
    assert f"logged in to {url} as {operator} (admin)" in result.stdout
    assert stat.S_IMODE(cli.credentials.stat().st_mode) == 0o600
    stored = json.loads(cli.credentials.read_text())
    assert stored["url"] == url and stored["username"] == operator
    assert stored["access_token"] and stored["refresh_token"]


async def test_a_wrong_password_is_one_line_and_exit_1(cli: Cli, url: str, operator: str) -> None:
    result = await cli("login", url, "-u", operator, "--password-stdin", input="not-it-at-all")

    assert result.exit_code == 1
    assert one_line(result.stderr).startswith("smarthome: 401: ")
    assert not cli.credentials.exists()


async def test_logout_forgets_the_login_and_revokes_its_refresh_token(
    operator_cli: Cli, gateway: Gateway
) -> None:
    refresh_token = json.loads(operator_cli.credentials.read_text())["refresh_token"]

    result = await operator_cli("logout")
    after = await operator_cli("devices", "ls")
    refreshed = await gateway.http.post(
        "/api/v1/auth/refresh", json={"refresh_token": refresh_token}
    )

    assert result.exit_code == 0, result.output
    assert not operator_cli.credentials.exists()
    assert after.exit_code == 2
    assert refreshed.status_code == 401


async def test_devices_are_added_listed_shown_and_commanded(operator_cli: Cli) -> None:
    device_id = unique_id("lamp")

    added = await operator_cli.json(
        "devices", "add", "--id", device_id, "--name", "Desk lamp", "--kind", "light"
    )
    listed = await operator_cli.json("devices", "ls", "--kind", "light")
    shown = await operator_cli.json("devices", "show", device_id)
    command = await operator_cli.json(
        "devices", "command", device_id, "set_brightness", "-p", "level=40"
    )
    table = await operator_cli("devices", "ls", "--kind", "light")
    await operator_cli.json("devices", "rm", device_id)
    after = await operator_cli.json("devices", "ls", "--kind", "light")

    assert added["id"] == device_id and added["credentials"]["password"]
    assert device_id in [d["id"] for d in listed]
    assert shown["name"] == "Desk lamp" and shown["kind"] == "light"
    assert (command["device_id"], command["action"], command["params"]) == (
        device_id,
        "set_brightness",
        {"level": 40},
    )
    assert command["status"] == "pending"
    assert table.exit_code == 0 and device_id in table.stdout and "Desk lamp" in table.stdout
    assert device_id not in [d["id"] for d in after]


async def test_a_refused_body_names_its_field_in_one_line_and_exits_1(operator_cli: Cli) -> None:
    result = await operator_cli("devices", "add", "--name", "x", "--kind", "not a kind")

    assert result.exit_code == 1
    line = one_line(result.stderr)
    assert line.startswith("smarthome: 422: ") and "$.kind" in line, line
    assert result.stdout == ""


async def test_an_unknown_device_is_the_problems_detail_and_exit_1(operator_cli: Cli) -> None:
    result = await operator_cli("devices", "show", unique_id("nobody"))

    assert result.exit_code == 1
    assert one_line(result.stderr).startswith("smarthome: 404: ")


async def test_without_a_login_a_one_line_hint_and_exit_2(cli: Cli) -> None:
    result = await cli("devices", "ls")

    assert result.exit_code == 2
    assert "smarthome login" in one_line(result.stderr)


async def test_an_unreachable_gateway_is_one_line_without_a_traceback(cli: Cli) -> None:
    nowhere = f"http://127.0.0.1:{embedded_nats.free_port()}"

    listed = await run(cli.process_env(SMARTHOME_URL=nowhere, SMARTHOME_TOKEN="t"), "devices", "ls")
    login = await run(cli.process_env(), "login", nowhere, "-u", "a", "--password-stdin")

    for code, out, err in (listed, login):
        assert code == 1, err
        assert one_line(err).startswith(f"smarthome: cannot reach the gateway at {nowhere}")
        assert out == ""


async def test_an_expired_access_token_is_traded_with_the_refresh_token(
    operator_cli: Cli,
) -> None:
    stored = json.loads(operator_cli.credentials.read_text())
    operator_cli.credentials.write_text(json.dumps({**stored, "expires_at": 0}))

    me = await operator_cli.json("locations", "ls")

    renewed = json.loads(operator_cli.credentials.read_text())
    assert isinstance(me, list)
    assert renewed["refresh_token"] != stored["refresh_token"]
    assert renewed["expires_at"] > stored["expires_at"]
    assert stat.S_IMODE(operator_cli.credentials.stat().st_mode) == 0o600


async def test_events_tail_follows_what_publish_sends_and_resumes_after_a_lost_connection(
    operator_cli: Cli, gateway: Gateway, url: str
) -> None:
    device_id = unique_id("meter")
    first = await operator_cli.json(
        "events", "publish", device_id, "telemetry", "--data", '{"power_w": 1.5}'
    )
    relay = Relay(int(url.rsplit(":", 1)[1]))
    env = operator_cli.process_env(
        SMARTHOME_URL=f"http://127.0.0.1:{relay.port}", SMARTHOME_TOKEN=gateway.token
    )
    tail = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "events", "tail",
        "--subject", f"events.{device_id}.>", "--since-seq", str(first["seq"] - 1),
        "--count", "2", "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert tail.stdout is not None and tail.stderr is not None
        line = await asyncio.wait_for(tail.stdout.readline(), LINE_TIMEOUT_S)
        replayed = json.loads(line)
        relay.cut()  # the connection is lost; the next event is published meanwhile
        second = await operator_cli.json(
            "events", "publish", device_id, "telemetry", "--data", '{"power_w": 2.5}'
        )
        line = await asyncio.wait_for(tail.stdout.readline(), LINE_TIMEOUT_S)
        resumed = json.loads(line)
        code = await asyncio.wait_for(tail.wait(), LINE_TIMEOUT_S)
        err = (await tail.stderr.read()).decode()
    finally:
        if tail.returncode is None:
            tail.kill()
            await tail.wait()
        relay.close()

    assert replayed["seq"] == first["seq"]
    assert replayed["subject"] == f"events.{device_id}.telemetry"
    assert replayed["data"]["data"] == {"power_w": 1.5}
    assert resumed["seq"] == second["seq"] and resumed["data"]["data"] == {"power_w": 2.5}
    assert code == 0, err
    assert f"following again after {first['seq']}" in err, err
    assert "Traceback" not in err


async def test_rules_are_applied_from_a_file_tried_over_history_and_disabled(
    operator_cli: Cli, tmp_path: Path
) -> None:
    device_id, rule_id = unique_id("lamp"), unique_id("rule")
    await operator_cli.json("devices", "add", "--id", device_id, "--name", "L", "--kind", "light")
    rule = {
        "id": rule_id,
        "name": "Lamp drawing too much: off",
        "trigger": {
            "type": "threshold",
            "device_id": device_id,
            "attribute": "power_w",
            "above": 50,
        },
        "actions": [{"type": "command", "device_id": device_id, "action": "turn_off"}],
    }
    path = tmp_path / "rule.json"
    path.write_text(json.dumps(rule))

    created = await operator_cli.json("rules", "apply", "-f", str(path))
    replaced = await operator_cli.json("rules", "apply", "-f", str(path))
    tried = await operator_cli.json("rules", "test", rule_id, "--since", "1h")
    tried_unsaved = await operator_cli.json("rules", "test", "-f", str(path), "--since", "1h")
    disabled = await operator_cli.json("rules", "disable", rule_id)
    listed = await operator_cli.json("rules", "ls")
    runs = await operator_cli.json("rules", "runs", rule_id)

    assert (created["applied"], created["version"]) == ("created", 1)
    assert (replaced["applied"], replaced["version"]) == ("replaced", 2)
    assert tried["rule_id"] == rule_id and tried["firings"] == []
    assert isinstance(tried["evaluated_rows"], int)
    assert tried_unsaved["firings"] == []
    assert disabled["enabled"] is False and disabled["trigger"] == replaced["trigger"]
    assert rule_id in [r["id"] for r in listed]
    assert runs == []


async def test_a_refused_rule_names_its_field(operator_cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "rule.json"
    path.write_text(json.dumps({"name": "no trigger", "actions": []}))

    result = await operator_cli("rules", "apply", "-f", str(path))

    assert result.exit_code == 1
    assert one_line(result.stderr).startswith("smarthome: 422: ")


async def test_audit_is_listed_both_ways_and_exported_with_progress(
    operator_cli: Cli, sessions: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    device_id = unique_id("audited")
    start = m.now() - timedelta(minutes=1)
    first_seq = uuid.uuid4().int % 10**12
    actions = ["device.created", "command.sent", "command.done"]
    async with sessions.begin() as session:  # what the recorder writes
        for i, action in enumerate(actions):
            session.add(
                AuditEntry(
                    time=start + timedelta(seconds=i), actor="user:operator", action=action,
                    device_id=device_id, result="ok", correlation_id=unique_id("corr"),
                    detail={"i": i}, stream="TEST", source_seq=first_seq + i,
                )
            )  # fmt: skip

    listed = await operator_cli.json("audit", "ls", "--device", device_id)
    latest = await operator_cli.json(
        "audit", "ls", "--device", device_id, "--newest-first", "--limit", "2"
    )
    exported = tmp_path / "audit.ndjson"
    export = await operator_cli("audit", "export", "--device", device_id, "-o", str(exported))

    assert [row["action"] for row in listed] == actions
    assert [row["action"] for row in latest] == ["command.done", "command.sent"]
    assert export.exit_code == 0, export.output
    rows = [json.loads(line) for line in exported.read_text().splitlines()]
    assert [row["action"] for row in rows] == actions
    assert "3 rows" in export.stderr, export.stderr


async def test_status_says_how_the_platform_is(operator_cli: Cli) -> None:
    status = await operator_cli.json("status")
    table = await operator_cli("status")

    assert status["gateway"]["status"] in ("ready", "degraded")
    assert set(status["devices"]) == {"total", "online", "offline", "stale"}
    assert table.exit_code == 0, table.output
    assert "devices" in table.stdout and "dead letters" in table.stdout


async def test_status_shows_each_services_consumer_lag(
    operator_cli: Cli, js: JetStreamContext
) -> None:
    name, instance = unique_id("lagging"), "host-1"
    lag = service_status.ConsumerLag(
        stream="EVENTS", consumer=f"{name}-events", pending=4242, ack_pending=17
    )
    now = time.time()
    report = service_status.ServiceStatus(
        name=name, instance=instance, state=service_status.ServiceState.READY, ready=True,
        why_not_ready=None, restarts=0, started_at=now, at=now, every_s=60.0,
        version="test", metrics_url=None, consumers=[lag],
    )  # fmt: skip
    kv = await js.key_value(service_status.BUCKET)
    key = service_status.key(name, instance)
    await kv.put(key, msgspec.json.encode(report))  # what the process's Reporter writes
    try:
        status = await operator_cli.json("status")
        shown = await operator_cli("status")
    finally:
        await kv.delete(key)

    assert [c for c in status["consumers"] if c["service"] == name] == [
        {
            "service": name,
            "instance": instance,
            "stream": "EVENTS",
            "consumer": f"{name}-events",
            "pending": 4242,
            "ack_pending": 17,
        }
    ]
    assert shown.exit_code == 0, shown.output
    (row,) = [line for line in shown.stdout.splitlines() if f"{name}-events" in line]
    assert "4242" in row and "17" in row, shown.stdout
    (service_row,) = [
        line for line in shown.stdout.splitlines() if name in line and "-events" not in line
    ]
    assert "4242" in service_row, shown.stdout  # the process's own total


async def test_one_command_lists_the_launcher_and_the_operator_commands(cli: Cli) -> None:
    code, out, err = await run(cli.process_env(), "--help")
    up_code, up_out, _ = await run(cli.process_env(), "up", "--help")

    assert code == 0, err
    for command in ("up", "migrate", "login", "status", "devices", "events", "rules", "audit"):
        assert f" {command} " in out, out
    assert up_code == 0 and "--no-demo" in up_out
