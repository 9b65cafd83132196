"""The demo: a light bulb, an energy tracker in front of it, and the rule that ties them."""

from __future__ import annotations

import asyncio
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


def rule(for_s: float) -> dict:
    return {
        "id": RULE_ID,
        "name": f"Light drawing power for more than {for_s:g}s: turn it off",
        "trigger": {
            "type": "threshold",
            "device_id": METER_ID,
            "attribute": "power_w",
            "above": 1.0,
            "for": for_s,
        },
        "actions": [
            {"type": "command", "device_id": LIGHT_ID, "action": "turn_off", "expires_s": 30},
            {"type": "set_state", "device_id": METER_ID, "state": "triggered"},
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


async def install_rule(api_url: str, token: str, for_s: float) -> str:
    """Store the demo rule through the public API unless it is stored already."""
    async with _client(api_url, token) as http:
        r = await http.post("/api/v1/rules", json=rule(for_s))
        if r.status_code in (200, 201):
            return "installed"
        if r.status_code == 409:
            return "already installed"
        raise RuntimeError(f"demo rule refused: {r.status_code} {r.text[:300]}")
