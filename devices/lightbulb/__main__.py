"""`python -m devices.lightbulb`: a light bulb that turns on and off by command."""

from __future__ import annotations

import asyncio
import contextlib

from devices.platform_link import PlatformLink, arguments, run
from libs import messages as m

RATED_POWER_W = 60.0


class LightBulb:
    def __init__(self, link: PlatformLink, on: bool = True) -> None:
        self.link = link
        self.on = on
        self.brightness = 100

    @property
    def attributes(self) -> dict[str, m.AttributeValue]:
        power = round(RATED_POWER_W * self.brightness / 100, 2) if self.on else 0.0
        return {"on": self.on, "brightness": self.brightness, "power_w": power}

    async def report(self, correlation_id: str | None = None) -> None:
        await self.link.publish("state", self.attributes, correlation_id=correlation_id)

    async def report_every(self, interval: float, stop: asyncio.Event) -> None:
        """Periodic telemetry, so that a meter plugged in later learns the draw too."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            if not stop.is_set():
                with contextlib.suppress(Exception):
                    await self.link.publish("telemetry", self.attributes)

    async def turn(self, command: m.Command, on: bool) -> str | None:
        self.on = on
        await self.report(command.correlation_id)
        return None

    async def set_brightness(self, command: m.Command) -> str | None:
        level = command.params.get("level")
        if not isinstance(level, int) or not 0 <= level <= 100:
            return "params.level must be an integer 0-100"
        self.brightness = level
        await self.report(command.correlation_id)
        return None


async def main(stop: asyncio.Event) -> None:
    args = arguments("A smarthome light bulb", "demo-light").parse_args()
    link = PlatformLink(args.id, "light", "Demo light bulb", args.api_url, args.nats_url)
    bulb = LightBulb(link)
    link.on_command("turn_on", lambda c: bulb.turn(c, True))
    link.on_command("turn_off", lambda c: bulb.turn(c, False))
    link.on_command("toggle", lambda c: bulb.turn(c, not bulb.on))
    link.on_command("set_brightness", bulb.set_brightness)
    async with link.heartbeat_file():
        await link.register(args.location, stop)
        if stop.is_set():
            return
        await link.connect()
        try:
            await link.publish("hello", {"attributes": bulb.attributes})
            await bulb.report()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(link.heartbeat(args.heartbeat, stop))
                tasks.create_task(link.take_commands(stop))
                tasks.create_task(bulb.report_every(2.0, stop))
        finally:
            await link.close()


if __name__ == "__main__":
    run(main)
