"""What the chart's demo-rule hook Job runs, `python -m services.launcher.demo`, against a
running gateway with the admin API key the migration registers: it stores the demo home and
rule once; run again (every upgrade), it changes nothing."""

from __future__ import annotations

import asyncio
import os
import secrets
import sys

from libs import accounts
from libs.principals import Role
from libs.settings import Settings
from services.gateway.app import create_app
from services.launcher import demo
from tests.helpers import unique_id
from tests.integration.test_gateway_ws import serving


async def run_job(api_url: str, token: str, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.launcher.demo", *args,
        env={**os.environ, "SMARTHOME_API_URL": api_url, "SMARTHOME_API_TOKEN": token},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_the_hook_stores_the_demo_rule_once(
    settings: Settings, sessions, admin_token: str
) -> None:  # type: ignore[no-untyped-def]
    key = f"shk_{secrets.token_hex(24)}"
    # As the migration registers `metrics-api-key` (under a name of this test's own).
    await accounts.ensure_api_key(sessions, unique_id("metrics"), Role.ADMIN, key)
    async with serving(create_app(settings), admin_token) as gateway:
        api_url = str(gateway.http.base_url)
        await gateway.http.delete(f"/api/v1/rules/{demo.RULE_ID}")  # another test's, if any
        options = ("--for", "7.5", "--light-id", "lamp-1", "--meter-id", "plug-1")

        assert await run_job(api_url, key, *options) == (
            0,
            f"demo rule {demo.RULE_ID}: installed\n",
        )
        assert await run_job(api_url, key, *options) == (
            0,
            f"demo rule {demo.RULE_ID}: already installed\n",
        )

        stored = (await gateway.http.get(f"/api/v1/rules/{demo.RULE_ID}")).json()
        assert stored["trigger"]["device_id"] == "plug-1"
        assert stored["trigger"]["for"] == 7.5
        assert [a["device_id"] for a in stored["actions"]] == ["lamp-1", "plug-1"]
        room = (await gateway.http.get("/api/v1/locations/living-room")).json()
        assert room["path"] == demo.ROOM_PATH
        await gateway.http.delete(f"/api/v1/rules/{demo.RULE_ID}")


async def test_the_hook_says_what_is_missing(settings: Settings, admin_token: str) -> None:
    async with serving(create_app(settings), admin_token) as gateway:
        api_url = str(gateway.http.base_url)
        status, out = await run_job(api_url, "")
        assert (status, out) == (2, "demo: set SMARTHOME_API_TOKEN (an administrator's API key)\n")
        status, out = await run_job(api_url, "shk_not-a-key-of-this-platform-at-all-x")
        assert status == 1 and out.startswith("demo: demo location refused: 401"), out
