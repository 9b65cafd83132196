"""The operator CLI against `smarthome up`, as an operator meets it on one machine: sign in
as the first admin, see the demo's devices, ask how the platform is. (The platform is the
e2e tests' shared one, whose access tokens live seconds: the CLI renews its own; that
`smarthome up` stops cleanly is the shared fixture's check and test_smarthome_up's.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.up import ADMIN_PASSWORD, Up
from tests.helpers import eventually

pytestmark = pytest.mark.e2e

DEMO_DEVICES = {"demo-light", "demo-meter"}


def smarthome(
    config_home: Path, *args: str, input: str | None = None
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SMARTHOME_URL", "SMARTHOME_TOKEN")}
    env.update(XDG_CONFIG_HOME=str(config_home), COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        input=input, capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip


async def test_an_operator_logs_in_and_sees_the_demo(tmp_path: Path, shared_up: Up) -> None:
    config_home = tmp_path / "config"
    up = shared_up
    login = smarthome(
        config_home, "login", up.api, "-u", "admin", "--password-stdin", input=ADMIN_PASSWORD
    )
    assert login.returncode == 0, login.stderr

    def demo_devices() -> list[dict]:
        listed = smarthome(config_home, "devices", "ls", "--json")
        assert listed.returncode == 0, listed.stderr
        devices = json.loads(listed.stdout)
        assert {d["id"] for d in devices} >= DEMO_DEVICES, devices
        return devices

    devices = await eventually(demo_devices, timeout=60, interval=0.5)
    table = smarthome(config_home, "devices", "ls")
    status = smarthome(config_home, "status", "--json")
    status_table = smarthome(config_home, "status")

    assert {d["kind"] for d in devices if d["id"] in DEMO_DEVICES} == {"light", "energy_meter"}
    assert table.returncode == 0 and all(d in table.stdout for d in DEMO_DEVICES), table.stdout
    assert status.returncode == 0, status.stderr
    summary = json.loads(status.stdout)
    assert summary["gateway"]["status"] == "ready"
    assert summary["devices"]["total"] >= 2
    assert status_table.returncode == 0, status_table.stderr
    assert "devices" in status_table.stdout
