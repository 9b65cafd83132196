"""`smarthome up`: bus, database, services and the demo on one machine, supervised."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

from libs import embedded_nats
from libs import settings as settings_mod
from libs.db.migrate import upgrade
from libs.settings import Settings
from services.launcher import demo
from services.launcher.supervisor import Child, python_module

log = logging.getLogger("smarthome")

SERVICES = ("gateway", "actors", "rules", "recorder", "webhooks")
DEVICES = ("lightbulb", "energy_tracker")
DEMO_DEVICE_ENV = {"SMARTHOME_DEVICE_LOCATION": demo.ROOM_PATH}


class StartError(Exception):
    """A clear one-line reason why the system cannot start."""


def choose_port(name: str, port: int, explicit: bool) -> int:
    """A taken default port is replaced by a free one; a taken explicit one is an error."""
    if embedded_nats.port_is_free(port):
        return port
    if explicit:
        raise StartError(f"{name}={port} is already in use; choose another port")
    free = embedded_nats.free_port()
    log.info("port %s (%s default) is taken; using %s", port, name, free)
    return free


def child_env(s: Settings, nats_url: str, http_port: int) -> dict[str, str]:
    env = {
        **os.environ,
        "NATS_URL": nats_url,
        "DATABASE_URL": s.effective_database_url,
        "SMARTHOME_DATA_DIR": str(s.data_dir.resolve()),
        "SMARTHOME_HTTP_PORT": str(http_port),
        "SMARTHOME_API_URL": f"http://127.0.0.1:{http_port}",
        "SMARTHOME_LOG_LEVEL": s.log_level,
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("SMARTHOME_HEALTH_PORT", None)  # one machine: only the gateway listens
    return env


async def up(s: Settings, with_demo: bool, demo_for: float) -> int:
    s.data_dir.mkdir(parents=True, exist_ok=True)
    # Every port is settled before anything starts: a refusal leaves nothing behind.
    http_port = choose_port("SMARTHOME_HTTP_PORT", s.http_port, s.http_port_explicit)
    nats_port = None
    mqtt_port = 0  # 0: no MQTT listener
    if not s.nats_url:
        nats_port = choose_port("SMARTHOME_NATS_PORT", s.nats_port, s.nats_port_explicit)
        if s.mqtt_port:
            mqtt_port = choose_port("SMARTHOME_MQTT_PORT", s.mqtt_port, s.mqtt_port_explicit)
    nats_url = s.nats_url or f"nats://127.0.0.1:{nats_port}"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    children: list[Child] = []
    watchers: list[asyncio.Task[None]] = []
    try:
        if nats_port is not None:
            children.append(await _start_bus(s, nats_port, mqtt_port))
        await asyncio.to_thread(upgrade, s.effective_database_url)
        log.info("database migrated (%s)", _redact(s.effective_database_url))
        env = child_env(s, nats_url, http_port)
        packages = [("services", n) for n in SERVICES]
        packages += [("devices", n) for n in DEVICES] if with_demo else []
        for package, name in packages:
            log_path = s.data_dir / "logs" / f"{name}.log"
            child_vars = env if package == "services" else {**env, **DEMO_DEVICE_ENV}
            children.append(Child(name, python_module(f"{package}.{name}"), child_vars, log_path))
            await children[-1].start()
        watchers = [asyncio.create_task(c.keep_running()) for c in children]
        if await _ready(env["SMARTHOME_API_URL"], with_demo, demo_for, stop):
            _banner(env["SMARTHOME_API_URL"], nats_url, _mqtt_address(s, mqtt_port), s)
        await stop.wait()
    finally:
        log.info("stopping")
        for child in reversed(children):
            await child.stop()
        for w in watchers:
            w.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
    log.info("stopped cleanly")
    return 0


async def _start_bus(s: Settings, port: int, mqtt_port: int) -> Child:
    conf = embedded_nats.write_config(s.data_dir, port, sync=s.nats_sync, mqtt_port=mqtt_port)
    argv = [embedded_nats.binary(), "-c", str(conf)]
    bus = Child("nats-server", argv, dict(os.environ), s.data_dir / "logs" / "nats-server.log")
    await bus.start()
    await asyncio.to_thread(embedded_nats.wait_for_server, port, mqtt_port)
    return bus


def _mqtt_address(s: Settings, mqtt_port: int) -> str:
    """Where devices connect over MQTT, or why they cannot."""
    if s.nats_url:
        return "not started: NATS_URL is set (MQTT is that server's listener, if it has one)"
    if not mqtt_port:
        return "off (SMARTHOME_MQTT_PORT=0)"
    return f"mqtt://127.0.0.1:{mqtt_port}"


async def _ready(api_url: str, with_demo: bool, demo_for: float, stop: asyncio.Event) -> bool:
    """Wait for the gateway (unless asked to stop first), then store the demo rule."""
    ready = asyncio.create_task(demo.wait_ready(api_url))
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not ready.done():
        ready.cancel()
        return False
    ready.result()
    if with_demo:
        await demo.install_locations(api_url)
        log.info("demo rule %s", await demo.install_rule(api_url, demo_for))
    return True


def _banner(api_url: str, nats_url: str, mqtt: str, s: Settings) -> None:
    print(
        "\n"
        f"  smarthome is up\n"
        f"  UI        {api_url}/\n"
        f"  API docs  {api_url}/schema\n"
        f"  NATS      {nats_url}\n"
        f"  MQTT      {mqtt}\n"
        f"  data      {s.data_dir.resolve()}  (logs in {s.data_dir.resolve() / 'logs'})\n"
        f"  Ctrl-C stops everything.\n",
        flush=True,
    )


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smarthome", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    up_p = sub.add_parser("up", help="run the whole system on this machine")
    up_p.add_argument("--no-demo", action="store_true", help="leave out the demo devices and rule")
    up_p.add_argument(
        "--demo-for",
        type=float,
        default=None,
        help="seconds the light may draw power before the demo rule turns it off (default 10)",
    )
    sub.add_parser("migrate", help="apply database migrations and exit")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="smarthome: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # its request lines are noise here
    try:
        s = settings_mod.load()
        if args.command == "migrate":
            s.data_dir.mkdir(parents=True, exist_ok=True)
            upgrade(s.effective_database_url)
            return
        demo_for = args.demo_for if args.demo_for is not None else s.demo_rule_for_s
        with contextlib.suppress(KeyboardInterrupt):
            sys.exit(asyncio.run(up(s, not args.no_demo, demo_for)))
    except (settings_mod.SettingsError, StartError) as exc:
        print(f"smarthome: {exc}", file=sys.stderr)
        sys.exit(2)
    except (TimeoutError, RuntimeError) as exc:  # the system did not come up: say why, once
        print(f"smarthome: {exc}", file=sys.stderr)
        sys.exit(1)
