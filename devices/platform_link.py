"""What every device program does to live on the platform, using only its public protocols:
register over HTTP, say hello on NATS, heartbeat, publish events, take and answer commands.

Devices stand for third-party hardware: they import only the wire messages and subjects.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import nats
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from devices import probe
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


def api_headers() -> dict[str, str]:
    """The HTTP API's credentials: `SMARTHOME_API_TOKEN` (an installer's API key or token),
    from the environment rather than the command line, where `ps` would show it."""
    token = os.environ.get("SMARTHOME_API_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def bus_tls() -> dict[str, ssl.SSLContext]:
    """The bus's TLS trust: `SMARTHOME_NATS_TLS_CA`, a private CA's certificate file to
    verify the server against (as the services' setting); unset: the system trust store."""
    ca = os.environ.get("SMARTHOME_NATS_TLS_CA")
    return {"tls": ssl.create_default_context(cafile=ca)} if ca else {}


class PlatformLink:
    def __init__(self, device_id: str, kind: str, name: str, api_url: str, nats_url: str) -> None:
        self.device_id = device_id
        self.kind = kind
        self.name = name
        self.api_url = api_url.rstrip("/")
        self.nats_url = nats_url
        self.nc: nats.NATS | None = None
        self._handlers: dict[str, Handler] = {}
        # Its bus password: given (SMARTHOME_DEVICE_PASSWORD), or issued at registration.
        self.password: str | None = os.environ.get("SMARTHOME_DEVICE_PASSWORD") or None
        # When JetStream last acknowledged one of our messages (wall clock): the readiness
        # that the heartbeat file carries.
        self.bus_acked_at: float | None = None

    def on_command(self, action: str, handler: Handler) -> None:
        self._handlers[action] = handler

    async def register(self, location: str | None, stop: asyncio.Event) -> None:
        """Register over HTTP unless registered, keeping the bus credentials the answer
        carries (shown once); registered already, ask for new ones (the old ones are then
        void). Waits for the gateway if it is not up yet."""
        claim_token = os.environ.get("SMARTHOME_PROVISIONING_TOKEN")
        if claim_token and not self.password and not api_headers():
            # No API key: claim the id with the installer's token and wait for approval.
            await self.claim(claim_token, stop)
            return
        body = {"id": self.device_id, "name": self.name, "kind": self.kind}
        if location:
            body["location"] = location
        delay = 0.2
        async with httpx.AsyncClient(
            base_url=self.api_url, timeout=5, headers=api_headers()
        ) as http:
            while not stop.is_set():
                try:
                    r = await http.post("/api/v1/devices", json=body)
                    if r.status_code == 201:
                        log.info("registered %s", self.device_id)
                        self.password = self.password or r.json()["credentials"]["password"]
                        return
                    if r.status_code == 409 and self.password:
                        return
                    if r.status_code == 409:
                        r = await http.post(f"/api/v1/devices/{self.device_id}/credentials")
                        if r.status_code in (200, 201):
                            log.info(
                                "registered already: %s has new bus credentials", self.device_id
                            )
                            self.password = r.json()["password"]
                            return
                    log.warning("registration answered %s: %s", r.status_code, r.text[:200])
                except httpx.HTTPError as exc:
                    log.info("gateway not reachable yet: %s", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 5.0)

    async def connect(self) -> None:
        """Connect as itself: its id and password; its replies under its own inbox."""
        self.nc = await nats.connect(
            self.nats_url,
            name=f"device-{self.device_id}",
            user=self.device_id,
            password=self.password or "",
            inbox_prefix=subjects.device_inbox(self.device_id),
            max_reconnect_attempts=-1,
            **bus_tls(),
        )

    async def claim(self, token: str, stop: asyncio.Event, hello_every: float = 5.0) -> bool:
        """Discovery with a provisioning token instead of an API key: connect with the token
        as password and a random nonce as connection name, say hello until an installer
        approves the device, and take the credentials the platform then sends to
        `provision.<id>.<nonce>`, which only this connection may read. False if stopped."""
        nonce = secrets.token_hex(16)
        claimant = await nats.connect(
            self.nats_url,
            name=nonce,
            user=self.device_id,
            password=token,
            inbox_prefix=subjects.inbox_prefix("claim", self.device_id),
            max_reconnect_attempts=-1,
            **bus_tls(),
        )
        try:
            sub = await claimant.subscribe(subjects.provision(self.device_id, nonce))
            hello = m.make_event(self.device_id, "hello", {"name": self.name, "kind": self.kind})
            while not stop.is_set():
                await claimant.publish(hello.nats_subject, m.encode(hello))
                try:
                    msg = await sub.next_msg(timeout=hello_every)
                except TimeoutError:
                    continue
                self.password = json.loads(msg.data)["password"]
                log.info("approved: %s has its bus credentials", self.device_id)
                return True
            return False
        finally:
            with contextlib.suppress(Exception):
                await claimant.close()

    async def publish(
        self,
        event_type: str,
        data: dict[str, Any] | None = None,
        correlation_id: str | None = None,
        traceparent: str | None = None,
    ) -> None:
        """Publish on our own subject and wait for JetStream's ack (then it is durable).
        `traceparent`: the W3C trace context it continues (a command's, for its status)."""
        assert self.nc is not None
        event = m.make_event(self.device_id, event_type, data, correlation_id=correlation_id)
        headers = {"Nats-Msg-Id": event.id}
        if traceparent:
            headers["traceparent"] = traceparent
        await self.nc.jetstream().publish(event.nats_subject, m.encode(event), headers=headers)
        self.bus_acked_at = time.time()

    @contextlib.asynccontextmanager
    async def heartbeat_file(self, every: float = 2.0) -> AsyncIterator[None]:
        """While inside, rewrite the heartbeat file (`SMARTHOME_DEVICE_HEARTBEAT_FILE`) every
        `every` seconds for Kubernetes' probes (devices/probe.py); removed on the way out.
        Unset: nothing is written."""
        path = probe.heartbeat_file()
        if path is None:
            yield
            return

        async def beat() -> None:
            while True:
                try:
                    probe.write(path, probe.Heartbeat(time.time(), self.bus_acked_at))
                except OSError as exc:  # the probe then sees it stale: a restart, with why
                    log.warning("cannot write the heartbeat file %s: %s", path, exc)
                await asyncio.sleep(every)

        task = asyncio.create_task(beat())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            path.unlink(missing_ok=True)

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
        # The status continues the command's trace (the platform's, as it came).
        traceparent = (msg.headers or {}).get("traceparent")

        async def status(value: str, detail: str | None = None) -> None:
            data = {"command_id": command.id, "status": value, "detail": detail}
            await self.publish("command_status", data, correlation_id=corr, traceparent=traceparent)

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
