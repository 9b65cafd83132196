"""What every device program does to live on the platform, using only its public protocols:
register over HTTP, say hello on NATS, heartbeat, publish events, take and answer commands.

Devices stand for third-party hardware: they import only the wire messages and subjects.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import nats
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from libs import messages as m
from libs import subjects

log = logging.getLogger("device")

# What a command handler answers: None when done, else why it failed.
Handler = Callable[[m.Command], Awaitable[str | None]]


def arguments(description: str, default_id: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--id", default=os.environ.get("SMARTHOME_DEVICE_ID", default_id))
    p.add_argument(
        "--api-url", default=os.environ.get("SMARTHOME_API_URL", "http://127.0.0.1:8000")
    )
    p.add_argument("--nats-url", default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"))
    p.add_argument("--heartbeat", type=float, default=5.0, help="seconds between heartbeats")
    p.add_argument("--location", default=os.environ.get("SMARTHOME_DEVICE_LOCATION"))
    return p


class PlatformLink:
    def __init__(self, device_id: str, kind: str, name: str, api_url: str, nats_url: str) -> None:
        self.device_id = device_id
        self.kind = kind
        self.name = name
        self.api_url = api_url.rstrip("/")
        self.nats_url = nats_url
        self.nc: nats.NATS | None = None
        self._handlers: dict[str, Handler] = {}

    def on_command(self, action: str, handler: Handler) -> None:
        self._handlers[action] = handler

    async def register(self, location: str | None, stop: asyncio.Event) -> None:
        """Register over HTTP unless registered; wait for the gateway if it is not up yet."""
        body = {"id": self.device_id, "name": self.name, "kind": self.kind}
        if location:
            body["location"] = location
        delay = 0.2
        async with httpx.AsyncClient(base_url=self.api_url, timeout=5) as http:
            while not stop.is_set():
                try:
                    r = await http.get(f"/api/v1/devices/{self.device_id}")
                    if r.status_code == 200:
                        return
                    r = await http.post("/api/v1/devices", json=body)
                    if r.status_code in (201, 409):
                        log.info("registered %s", self.device_id)
                        return
                    log.warning("registration answered %s: %s", r.status_code, r.text[:200])
                except httpx.HTTPError as exc:
                    log.info("gateway not reachable yet: %s", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 5.0)

    async def connect(self) -> None:
        self.nc = await nats.connect(
            self.nats_url, name=f"device-{self.device_id}", max_reconnect_attempts=-1
        )

    async def publish(
        self, event_type: str, data: dict[str, Any] | None = None, correlation_id: str | None = None
    ) -> None:
        """Publish on our own subject and wait for JetStream's ack (then it is durable)."""
        assert self.nc is not None
        event = m.make_event(self.device_id, event_type, data, correlation_id=correlation_id)
        await self.nc.jetstream().publish(
            event.nats_subject, m.encode(event), headers={"Nats-Msg-Id": event.id}
        )

    async def heartbeat(self, every: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)
            if not stop.is_set():
                with contextlib.suppress(Exception):
                    await self.publish("heartbeat")

    async def take_commands(self, stop: asyncio.Event) -> None:
        """A durable consumer on our own command subject: commands sent while we were away
        arrive when we come back; each is answered delivered → done | failed | expired."""
        assert self.nc is not None
        js = self.nc.jetstream()
        durable = f"device-{self.device_id}"
        sub = await js.pull_subscribe(
            subjects.commands(self.device_id),
            durable=durable,
            stream=subjects.COMMANDS_STREAM,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.NEW),
        )
        try:
            while not stop.is_set():
                try:
                    msgs = await sub.fetch(10, timeout=1.0)
                except TimeoutError:
                    continue
                for msg in msgs:
                    await self._answer(msg)
                    await msg.ack()
        finally:
            await sub.unsubscribe()  # a pull subscription left to drain() blocks it

    async def _answer(self, msg: Msg) -> None:
        try:
            command = m.command_decoder.decode(msg.data)
        except Exception as exc:
            log.warning("unreadable command: %s", exc)
            return
        corr = command.correlation_id

        async def status(value: str, detail: str | None = None) -> None:
            data = {"command_id": command.id, "status": value, "detail": detail}
            await self.publish("command_status", data, correlation_id=corr)

        if command.expires_at < m.now():
            await status("expired", "received after its expiry")
            return
        handler = self._handlers.get(command.action)
        if handler is None:
            await status("failed", f"unknown action {command.action!r}")
            return
        await status("delivered")
        try:
            error = await handler(command)
        except Exception as exc:  # a broken handler fails the command, not the device
            error = f"{type(exc).__name__}: {exc}"
        await status("failed" if error else "done", error)

    async def close(self) -> None:
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.publish("goodbye")
            with contextlib.suppress(Exception):
                await self.nc.drain()


def run(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run a device until SIGINT/SIGTERM."""
    logging.basicConfig(
        level=os.environ.get("SMARTHOME_LOG_LEVEL", "INFO"),
        format='{"time":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s","msg":"%(message)s"}',
    )

    async def supervise() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(supervise())
