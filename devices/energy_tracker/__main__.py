"""`python -m devices.energy_tracker`: a metering plug that reports the power drawn
by the device plugged into it, every `--interval` seconds."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Callable

import httpx

from devices.platform_link import PlatformLink, api_headers, arguments, run
from libs import messages as m
from libs import subjects


class EnergyTracker:
    def __init__(self, link: PlatformLink) -> None:
        self.link = link
        self.power_w = 0.0
        self.energy_wh = 0.0
        self._since = time.monotonic()

    def sense(self, data: bytes) -> None:
        """The simulated wire: the plugged device's reported power is what the plug measures."""
        try:
            event = m.cloud_event_decoder.decode(data)
        except Exception:
            return
        power = (event.data or {}).get("power_w")
        if isinstance(power, int | float) and not isinstance(power, bool):
            self._integrate()
            self.power_w = float(power)

    def _integrate(self) -> None:
        now = time.monotonic()
        self.energy_wh += self.power_w * (now - self._since) / 3600
        self._since = now

    async def report_every(self, interval: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._integrate()
            data = {"power_w": self.power_w, "energy_wh": round(self.energy_wh, 4)}
            with contextlib.suppress(Exception):
                await self.link.publish("telemetry", data)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    async def reset(self, _command: m.Command) -> str | None:
        self.energy_wh = 0.0
        return None


async def main(stop: asyncio.Event) -> None:
    parser = arguments("A smarthome energy tracker", "demo-meter")
    parser.add_argument("--metered-device", default="demo-light")
    parser.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args()
    link = PlatformLink(args.id, "energy_meter", "Demo energy tracker", args.api_url, args.nats_url)
    tracker = EnergyTracker(link)
    link.on_command("reset_energy", tracker.reset)
    async with link.heartbeat_file():
        await link.register(args.location, stop)
        if stop.is_set():
            return
        await link.connect()
        await report(link, tracker, args, stop)


async def report(
    link: PlatformLink, tracker: EnergyTracker, args: argparse.Namespace, stop: asyncio.Event
) -> None:
    """Connected: say hello, then meter, report and take commands until asked to stop."""
    # A live stream does not end when asked to stop: cancelled instead.
    wire = asyncio.create_task(follow(args.api_url, args.metered_device, tracker.sense, stop))
    try:
        await link.publish("hello", {"attributes": {"metered_device": args.metered_device}})
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(link.heartbeat(5.0, stop))
            tasks.create_task(link.take_commands(stop))
            tasks.create_task(tracker.report_every(args.interval, stop))
    finally:
        wire.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await wire
        await link.close()


async def follow(
    api_url: str, device_id: str, sense: Callable[[bytes], None], stop: asyncio.Event
) -> None:
    """The plugged device's events, live over the HTTP API (SSE, with the installer's
    token): on the bus a device reads only its own commands, never another's events."""
    url = f"{api_url.rstrip('/')}/api/v1/events/stream"
    params = {"subject": subjects.device_events_all(device_id)}
    delay = 0.5
    while not stop.is_set():
        try:
            async with (
                httpx.AsyncClient(timeout=None, headers=api_headers()) as http,
                http.stream("GET", url, params=params) as r,
            ):
                data: list[str] = []
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        data.append(line[6:])
                    elif not line and data:
                        sense("\n".join(data).encode())
                        data = []
                    delay = 0.5
        except httpx.HTTPError:
            pass
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        delay = min(delay * 2, 5.0)


if __name__ == "__main__":
    run(main)
