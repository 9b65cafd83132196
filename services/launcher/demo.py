"""The demo: a light bulb, an energy tracker in front of it, and the rule that ties them.

`python -m services.launcher.demo` stores the demo's home and rule in a running platform
through its API, as `smarthome up` does (the Helm chart's post-install hook runs it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

import httpx

LIGHT_ID = "demo-light"
METER_ID = "demo-meter"
RULE_ID = "demo-light-timeout"
# Where the demo devices are (`SMARTHOME_DEVICE_LOCATION` of their processes).
HOME_ID = "home"
LOCATIONS = (
    {"id": HOME_ID, "name": "Home", "kind": "home"},
    {"id": "living-room", "name": "Living room", "kind": "room", "parent_id": "home"},
)
ROOM_PATH = "home/living-room"


def rule(for_s: float, light_id: str = LIGHT_ID, meter_id: str = METER_ID) -> dict:
    return {
        "id": RULE_ID,
        "name": f"Light drawing power for more than {for_s:g}s: turn it off",
        "trigger": {
            "type": "threshold",
            "device_id": meter_id,
            "attribute": "power_w",
            "above": 1.0,
            "for": for_s,
        },
        "actions": [
            {"type": "command", "device_id": light_id, "action": "turn_off", "expires_s": 30},
            {"type": "set_state", "device_id": meter_id, "state": "triggered"},
        ],
    }


async def wait_ready(api_url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=api_url, timeout=2) as http:
        while True:
            try:
                if (await http.get("/health/ready")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway at {api_url} not ready after {timeout}s")
            await asyncio.sleep(0.2)


def _client(api_url: str, token: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=api_url, timeout=5, headers={"Authorization": f"Bearer {token}"}
    )


async def install_locations(api_url: str, token: str) -> None:
    """Define the demo's home and room through the public API unless they are defined."""
    async with _client(api_url, token) as http:
        for location in LOCATIONS:
            r = await http.post("/api/v1/locations", json=location)
            if r.status_code not in (201, 409):
                raise RuntimeError(f"demo location refused: {r.status_code} {r.text[:300]}")


async def install_rule(
    api_url: str, token: str, for_s: float, light_id: str = LIGHT_ID, meter_id: str = METER_ID
) -> str:
    """Store the demo rule through the public API unless it is stored already."""
    async with _client(api_url, token) as http:
        r = await http.post("/api/v1/rules", json=rule(for_s, light_id, meter_id))
        if r.status_code in (200, 201):
            return "installed"
        if r.status_code == 409:
            return "already installed"
        raise RuntimeError(f"demo rule refused: {r.status_code} {r.text[:300]}")


async def install(args: argparse.Namespace, token: str) -> str:
    """Wait for the gateway, then store the demo's home and rule (what is there stays)."""
    await wait_ready(args.api_url, args.wait)
    await install_locations(args.api_url, token)
    return await install_rule(args.api_url, token, args.for_s, args.light_id, args.meter_id)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m services.launcher.demo",
        description="Store the demo's home and rule through a running platform's API. The "
        "token: SMARTHOME_API_TOKEN, an administrator's API key or access token.",
    )
    p.add_argument(
        "--api-url", default=os.environ.get("SMARTHOME_API_URL", "http://127.0.0.1:8000")
    )
    p.add_argument("--for", dest="for_s", type=float, default=10.0, help="the rule's seconds")
    p.add_argument("--light-id", default=LIGHT_ID)
    p.add_argument("--meter-id", default=METER_ID)
    p.add_argument("--wait", type=float, default=300.0, help="seconds to wait for the gateway")
    args = p.parse_args(argv)
    token = os.environ.get("SMARTHOME_API_TOKEN")
    if not token:
        print("demo: set SMARTHOME_API_TOKEN (an administrator's API key)", file=sys.stderr)
        return 2
    try:
        print(f"demo rule {RULE_ID}: {asyncio.run(install(args, token))}", flush=True)
    except (TimeoutError, RuntimeError, httpx.HTTPError) as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
