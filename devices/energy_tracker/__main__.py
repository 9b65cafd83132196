"""`python -m devices.energy_tracker`: a metering plug that reports the power drawn
by the device plugged into it, every `--interval` seconds."""

from __future__ import annotations

import asyncio
import contextlib
import time

from nats.aio.msg import Msg

from devices.platform_link import PlatformLink, arguments, run
from libs import messages as m
from libs import subjects


class EnergyTracker:
    def __init__(self, link: PlatformLink) -> None:
        self.link = link
        self.power_w = 0.0
        self.energy_wh = 0.0
        self._since = time.monotonic()

    def sense(self, msg: Msg) -> None:
        """The simulated wire: the plugged device's reported power is what the plug measures."""
        try:
            event = m.cloud_event_decoder.decode(msg.data)
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
    await link.register(args.location, stop)
    if stop.is_set():
        return
    await link.connect()
    assert link.nc is not None
    wire = await link.nc.subscribe(
        subjects.device_events(args.metered_device, "*"), cb=_async(tracker.sense)
    )
    try:
        await link.publish("hello", {"attributes": {"metered_device": args.metered_device}})
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(link.heartbeat(5.0, stop))
            tasks.create_task(link.take_commands(stop))
            tasks.create_task(tracker.report_every(args.interval, stop))
    finally:
        with contextlib.suppress(Exception):
            await wire.unsubscribe()
        await link.close()


def _async(fn):  # type: ignore[no-untyped-def]
    async def cb(msg: Msg) -> None:
        fn(msg)

    return cb


if __name__ == "__main__":
    run(main)
