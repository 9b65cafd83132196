"""`python -m devices.simulator`: N virtual devices (sensors, lights, energy meters) that
register over HTTP, say hello, report telemetry every `--interval` seconds (each at its own
phase), answer their commands and say goodbye, all on one NATS connection. For load and
demos: `--duration` ends a run by itself; a summary is printed at the end.

Like any device it uses only the public protocols: it publishes under its devices'
`events.<id>.>` and reads their `commands.<id>` (plain subscriptions: a command sent while
the simulator is down is not replayed, and expires). On the bus it is a bridge (`--prefix`
names it): one identity that speaks for exactly its devices, made over HTTP with the
installer's `SMARTHOME_API_TOKEN`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import sys
import time
from collections import Counter
from functools import partial

import httpx
import nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from devices.platform_link import api_headers, bus_tls, run
from devices.simulator.fleet import KINDS, VirtualDevice, fleet
from devices.simulator.schedule import Schedule
from libs import messages as m
from libs import subjects

log = logging.getLogger("simulator")

TAKES_COMMANDS = ("light", "energy_meter")
API_PREFIX = "/api/v1"
REGISTER_IN_FLIGHT = 16  # registrations at once: the gateway is not a load test's target
ACKS_IN_FLIGHT = 2000  # publishes not acknowledged yet, at most
STOP_SEEN_S = 0.5


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Many virtual smarthome devices")
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--prefix", default="sim")
    p.add_argument("--kinds", default=",".join(KINDS), help="taken in turn: " + ", ".join(KINDS))
    p.add_argument("--interval", type=float, default=10.0, help="seconds between readings")
    p.add_argument("--duration", type=float, default=0.0, help="seconds; 0: until stopped")
    p.add_argument(
        "--location",
        default=os.environ.get("SMARTHOME_DEVICE_LOCATION"),
        help="where the devices are (default: a home named after --prefix); its home is "
        "the bridge's, the one connection that speaks for them",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--api-url", default=os.environ.get("SMARTHOME_API_URL", "http://127.0.0.1:8000")
    )
    p.add_argument("--nats-url", default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"))
    args = p.parse_args()
    kinds = tuple(k for k in args.kinds.split(",") if k)
    if not kinds or any(k not in KINDS for k in kinds):
        p.error(f"--kinds: each one of {', '.join(KINDS)}")
    if args.count < 1 or args.interval <= 0:
        p.error("--count must be at least 1 and --interval above 0")
    args.kinds = kinds
    if not subjects.is_token(args.prefix):
        p.error("--prefix: 1-128 characters of A-Z a-z 0-9 _ - (it names the bridge too)")
    args.location = args.location or args.prefix
    args.api_url = api_root(args.api_url)
    return args


def api_root(url: str) -> str:
    """The gateway's root URL: `http://host:8000/api/v1` (the API's base, a natural guess)
    names the same gateway as `http://host:8000`."""
    return url.strip().rstrip("/").removesuffix(API_PREFIX).rstrip("/")


class NotAGateway(RuntimeError):
    """The API URL answers, but not as the gateway's root."""


class Publisher:
    """JetStream publishes with a bounded number awaiting their ack; counts the outcomes."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self._room = asyncio.Semaphore(ACKS_IN_FLIGHT)
        self._waiting: set[asyncio.Future] = set()
        self.acked = 0
        self.failed = 0

    async def publish(
        self, device_id: str, event_type: str, data: dict, correlation_id: str | None = None
    ) -> None:
        event = m.make_event(device_id, event_type, data, correlation_id=correlation_id)
        await self._room.acquire()
        try:
            ack = await self._js.publish_async(
                event.nats_subject, m.encode(event), headers={"Nats-Msg-Id": event.id}
            )
        except Exception:
            self._room.release()
            self.failed += 1
            return
        self._waiting.add(ack)
        ack.add_done_callback(self._settled)

    def _settled(self, ack: asyncio.Future) -> None:
        self._waiting.discard(ack)
        self._room.release()
        if ack.cancelled() or ack.exception() is not None:
            self.failed += 1
        else:
            self.acked += 1

    async def flush(self) -> None:
        if self._waiting:
            await asyncio.wait(list(self._waiting), timeout=10)


async def register_all(
    args: argparse.Namespace, devices: list[VirtualDevice], stop: asyncio.Event
) -> str | None:
    """Make (or renew the password of) the bridge `--prefix` that speaks for the fleet on one
    connection, then register every device through it (already registered is fine); the
    bridge's password, or None if stopped."""
    async with httpx.AsyncClient(base_url=args.api_url, timeout=10, headers=api_headers()) as http:
        if not await _gateway_ready(http, stop):
            return None
        password = await _bridge(http, args.prefix, args.location)
        room = asyncio.Semaphore(REGISTER_IN_FLIGHT)

        async def one(device: VirtualDevice) -> None:
            body = {"id": device.id, "name": device.id, "kind": device.kind}
            body.update(location=args.location, bridge=args.prefix)
            async with room:
                r = await http.post("/api/v1/devices", json=body)
            if r.status_code not in (201, 409):
                raise RuntimeError(f"registering {device.id}: {r.status_code} {r.text[:200]}")

        await asyncio.gather(*(one(d) for d in devices))
    return password


async def _bridge(http: httpx.AsyncClient, bridge_id: str, location: str) -> str:
    """The bridge's password: made now, or renewed if it exists (shown once either way)."""
    home = location.split("/", 1)[0]
    r = await http.post("/api/v1/bridges", json={"id": bridge_id, "name": bridge_id, "home": home})
    if r.status_code == 201:
        return str(r.json()["credentials"]["password"])
    if r.status_code == 409:
        r = await http.post(f"/api/v1/bridges/{bridge_id}/credentials")
        if r.status_code in (200, 201):
            return str(r.json()["password"])
    raise RuntimeError(f"bridge {bridge_id}: {r.status_code} {r.text[:200]}")


async def _gateway_ready(http: httpx.AsyncClient, stop: asyncio.Event) -> bool:
    """Wait for the gateway to be ready (it may be starting); a URL that is not a gateway's
    (its `/health/ready` is a 404) is an error at once, not a wait."""
    delay = 0.2
    while not stop.is_set():
        with contextlib.suppress(httpx.HTTPError):
            status = (await http.get("/health/ready")).status_code
            if status == 200:
                return True
            if status == 404:
                raise NotAGateway(
                    f"{http.base_url}health/ready answers 404: --api-url must be the "
                    "gateway's root URL, e.g. http://127.0.0.1:8000"
                )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        delay = min(delay * 2, 5.0)
    return False


async def answer(device: VirtualDevice, out: Publisher, answered: Counter, msg: Msg) -> None:
    """delivered → (its new state) → done | failed, or expired, as a real device does."""
    try:
        command = m.command_decoder.decode(msg.data)
    except Exception as exc:
        log.warning("unreadable command for %s: %s", device.id, exc)
        return
    status = partial(_status, out, device.id, command)
    if command.expires_at < m.now():
        await status("expired", "received after its expiry")
    else:
        await status("delivered")
        error = device.command(command.action, command.params)
        if error is None:
            await out.publish(device.id, "state", dict(device.attributes), command.correlation_id)
        await status("failed" if error else "done", error)
    answered[command.action] += 1


async def _status(
    out: Publisher, device_id: str, command: m.Command, value: str, detail: str | None = None
) -> None:
    data = {"command_id": command.id, "status": value, "detail": detail}
    await out.publish(device_id, "command_status", data, command.correlation_id)


async def report_all(
    devices: list[VirtualDevice], out: Publisher, interval: float, stop: asyncio.Event
) -> None:
    """Telemetry of every device every `interval`, each at its own phase (`Schedule`)."""
    loop = asyncio.get_running_loop()
    schedule = Schedule(len(devices), interval, loop.time(), random.Random())
    while not stop.is_set():
        for i, elapsed in schedule.take_due(loop.time()):
            device = devices[i]
            await out.publish(device.id, "telemetry", device.reading(elapsed))
        next_at = schedule.next_at()
        if next_at is None:
            await stop.wait()
        elif (wait := next_at - loop.time()) > 0:
            # Slept, not waited on `stop` (a task per wait): a stop is seen within STOP_SEEN_S.
            await asyncio.sleep(min(wait, STOP_SEEN_S))


async def main(stop: asyncio.Event) -> None:
    args = arguments()
    devices = fleet(args.prefix, args.count, args.kinds, args.seed)
    began = time.monotonic()
    try:
        password = await register_all(args, devices, stop)
    except NotAGateway as exc:
        print(f"simulator: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    if password is None:
        return
    log.info("registered %d devices in %.1f s", len(devices), time.monotonic() - began)
    if args.duration > 0:  # of reporting, after the registrations
        asyncio.get_running_loop().call_later(args.duration, stop.set)
    started = time.monotonic()
    nc = await nats.connect(
        args.nats_url,
        name="simulator",
        user=f"bridge:{args.prefix}",
        password=password,
        inbox_prefix=subjects.inbox_prefix("bridge", args.prefix),
        max_reconnect_attempts=-1,
        **bus_tls(),
    )
    out = Publisher(nc.jetstream())
    answered: Counter = Counter()
    try:
        for device in devices:
            if device.kind in TAKES_COMMANDS:
                cb = partial(answer, device, out, answered)
                await nc.subscribe(subjects.commands(device.id), cb=cb)
            await out.publish(device.id, "hello", {"attributes": dict(device.attributes)})
        await report_all(devices, out, args.interval, stop)
    finally:
        with contextlib.suppress(Exception):  # a bus that is gone does not hold the exit
            async with asyncio.timeout(10):
                for device in devices:
                    await out.publish(device.id, "goodbye", {})
                await out.flush()
        with contextlib.suppress(Exception):
            await nc.drain()
        print(summary(devices, out, answered, time.monotonic() - started), flush=True)


def summary(devices: list[VirtualDevice], out: Publisher, answered: Counter, seconds: float) -> str:
    kinds = Counter(d.kind for d in devices)
    mix = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    rate = out.acked / seconds if seconds else 0.0
    return (
        f"simulator: {len(devices)} devices ({mix}) for {seconds:.1f} s\n"
        f"  events acknowledged: {out.acked} ({rate:.1f}/s); not acknowledged: {out.failed}\n"
        f"  commands answered: {sum(answered.values())}"
        + "".join(f"; {action} {n}" for action, n in sorted(answered.items()))
    )


if __name__ == "__main__":
    run(main)
