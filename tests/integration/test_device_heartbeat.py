"""A demo device started as Kubernetes starts it writes the heartbeat file its probes read:
live while its loop turns, ready once the bus acknowledges it, gone when it stops."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from libs import embedded_nats
from libs.settings import Settings
from services.gateway.app import create_app
from tests.helpers import eventually, unique_id
from tests.integration.test_gateway_ws import serving
from tests.processes import Service


async def probe(check: str, path: Path, max_age: float) -> tuple[int, str]:
    """What the kubelet's exec probe gets: the exit status and the output."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "devices.probe", check, str(path), str(max_age),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


@asynccontextmanager
async def device(
    module: str, heartbeat: Path, api_url: str, nats_url: str, token: str = ""
) -> AsyncIterator[asyncio.subprocess.Process]:
    env = {
        **os.environ,
        "SMARTHOME_DEVICE_ID": unique_id("hb"),
        "SMARTHOME_DEVICE_HEARTBEAT_FILE": str(heartbeat),
        "SMARTHOME_API_URL": api_url,
        "NATS_URL": nats_url,
        "SMARTHOME_API_TOKEN": token,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), timeout=20)
        assert proc.returncode == 0, err.decode()[-2000:]


async def passes(check: str, path: Path, max_age: float) -> bool:
    status, out = await probe(check, path, max_age)
    assert status == 0, out
    return True


async def test_a_device_waiting_for_the_gateway_is_live_but_not_ready(tmp_path: Path) -> None:
    heartbeat = tmp_path / "heartbeat.json"
    nowhere = f"http://127.0.0.1:{embedded_nats.free_port()}"
    async with device("devices.lightbulb", heartbeat, nowhere, "nats://127.0.0.1:1"):
        await eventually(lambda: passes("live", heartbeat, 20), timeout=20)
        assert await probe("ready", heartbeat, 15) == (
            1,
            "ready: the bus has acknowledged nothing yet\n",
        )
    assert not heartbeat.exists(), "a stopped device leaves its heartbeat behind"


async def test_connected_demo_devices_are_ready(
    settings: Settings,
    service_env: dict[str, str],
    data_dir: Path,
    admin_token: str,
    tmp_path: Path,
) -> None:
    async with serving(create_app(settings), admin_token) as gateway:
        # After the gateway: it provisions the consumer the auth callout reads.
        busauth = Service("services.busauth", service_env, data_dir)
        await asyncio.to_thread(busauth.start)
        try:
            api_url = str(gateway.http.base_url)
            nats_url = settings.effective_nats_url
            light, meter = tmp_path / "light.json", tmp_path / "meter.json"
            async with (
                device("devices.lightbulb", light, api_url, nats_url, admin_token),
                device("devices.energy_tracker", meter, api_url, nats_url, admin_token),
            ):
                for heartbeat in (light, meter):
                    await eventually(lambda h=heartbeat: passes("ready", h, 15), timeout=30)
                    assert await probe("live", heartbeat, 20) == (0, "")
        finally:
            busauth.stop()
