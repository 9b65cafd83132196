"""`smarthome up`: bus, database, services and the demo on one machine, supervised."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import logging
import math
import os
import signal
import socket
import sys
from pathlib import Path

from libs import bus, bus_auth, bus_grants, embedded_nats, service_status
from libs import settings as settings_mod
from libs.db.migrate import upgrade
from libs.passwords import MIN_PASSWORD_LENGTH
from libs.settings import Settings
from services.launcher import credentials, demo
from services.launcher.supervisor import Child, python_module

log = logging.getLogger("smarthome")

# busauth first: the devices' connections wait on its answers.
SERVICES = ("busauth", "gateway", "actors", "rules", "recorder", "webhooks")
BUS_DIR = "bus"  # in the data dir: the callout's issuer key, the services' bus passwords
DEVICES = ("lightbulb", "energy_tracker")
DEMO_DEVICE_ENV = {"SMARTHOME_DEVICE_LOCATION": demo.ROOM_PATH}
LOOPBACK = "127.0.0.1"
SERVICES_ROUTE = "/api/v1/system/services"


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


def child_env(
    s: Settings, nats_url: str, http_port: int, max_store: int | None = None
) -> dict[str, str]:
    """What every child is told; `max_store`: the embedded bus's storage limit in bytes,
    which the gateway shares out as the streams' byte budgets (None: as configured)."""
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
    if max_store is not None:  # `auto` resolved: the services budget for what is used
        env["SMARTHOME_NATS_MAX_STORE"] = str(max_store)
    env.pop("SMARTHOME_HEALTH_PORT", None)  # each worker gets a port of its own
    for identity in (bus_grants.ENV_USER, bus_grants.ENV_PASSWORD, bus_grants.ENV_SYSTEM_PASSWORD):
        env.pop(identity, None)  # each child gets its own (`_identity`), none another's
    return env


def _identity(s: Settings, package: str, name: str) -> dict[str, str]:
    """A service's own bus identity, when the launcher runs the bus (with NATS_URL set, the
    environment gives each process its own); devices get theirs when they register."""
    if s.nats_url or package != "services":
        return {}
    return bus_grants.service_env(bus_grants.ensure_service_passwords(s.data_dir / BUS_DIR), name)


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
    scheme = "tls" if s.nats_tls_cert else "nats"
    nats_url = s.nats_url or f"{scheme}://127.0.0.1:{nats_port}"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    children: list[Child] = []
    watchers: list[asyncio.Task[None]] = []
    max_store = None  # an external bus's: as configured
    try:
        if nats_port is not None:
            bus_child, max_store = await _start_bus(s, nats_port, mqtt_port)
            children.append(bus_child)
        await asyncio.to_thread(upgrade, s.effective_database_url)
        log.info("database migrated (%s)", _redact(s.effective_database_url))
        admin_password, keys = await credentials.prepare(s)
        env = child_env(s, nats_url, http_port, max_store)
        metrics: dict[str, str] = {}  # where each service's /metrics is
        packages = [("services", n, c) for n in SERVICES for c in copies(n, s)]
        packages += [("devices", n, n) for n in DEVICES] if with_demo else []
        for package, name, child in packages:
            log_path = s.data_dir / "logs" / f"{child}.log"
            child_vars = env if package == "services" else {**env, **DEMO_DEVICE_ENV}
            child_vars = {**child_vars, **_identity(s, package, name)}
            if package == "devices":  # they register themselves, as an installer would
                child_vars["SMARTHOME_API_TOKEN"] = keys[credentials.DEVICES_KEY]
            else:
                monitoring, metrics[child] = _monitoring(child, env["SMARTHOME_API_URL"])
                child_vars.update(monitoring)
            argv = python_module(f"{package}.{name}")
            children.append(Child(child, argv, child_vars, log_path, nice=nice_of(name, s)))
            await children[-1].start()
        watchers = [asyncio.create_task(c.keep_running()) for c in children]
        watchers += [asyncio.create_task(c.watch_health()) for c in children if c.health_url]
        launcher_key = keys[credentials.LAUNCHER_KEY]
        if await _ready(env["SMARTHOME_API_URL"], launcher_key, with_demo, demo_for, stop):
            _banner(env["SMARTHOME_API_URL"], nats_url, _mqtt_address(s, mqtt_port), s, metrics)
            if admin_password:
                _first_admin(admin_password)
        await stop.wait()
    finally:
        log.info("stopping")
        for tier in stopping_order(children):
            await asyncio.gather(*(child.stop() for child in tier))
        for w in watchers:
            w.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
    log.info("stopped cleanly")
    return 0


# Started first, stopped last, one at a time: the bus's authority, then the gateway.
STOPPED_LAST = ("gateway", "busauth")


def stopping_order(children: list[Child]) -> list[list[Child]]:
    """The reverse of the start, in tiers stopped together: the demo devices, then the
    workers (each drains its own connection), then the gateway, then busauth."""
    last = [[c] for name in STOPPED_LAST for c in children if c.name == name]
    rest = [c for c in children if c.name not in STOPPED_LAST]
    devices = [c for c in rest if c.name in DEVICES]
    workers = [c for c in rest if c.name not in DEVICES]
    return [tier for tier in (devices, workers, *last) if tier]


# The services whose work can wait: the recorder's history and audit stay in the bus until
# written. On a machine short of CPU they yield it (`SMARTHOME_BACKGROUND_NICE`) to the live
# path (the bus, the actors, the rules, the gateway), whose tail latency is what a user sees:
# in the 10-minute soak at 1,000 events/s on 2 cores, p99 event → state fact 32.7 ms with
# all alike, 22.7-24.3 ms with the recorder (and the load generator) at nice 10, 12.1 at 19.
# Under a long saturation it falls behind (its lag shows it) and catches up when CPU frees.
BACKGROUND = frozenset({"recorder"})


def nice_of(name: str, s: Settings) -> int:
    """The niceness `up` adds for a service (0: as the launcher). 0 on SQLite too: one write
    lock for the whole database, and a recorder starved of CPU while it holds the lock holds
    up every writer behind it (the actors' commits, so their acks and, two batches on, a
    partition's facts): a priority inversion. Postgres locks rows; its writers never wait
    on the recorder."""
    if name not in BACKGROUND or s.effective_database_url.startswith("sqlite"):
        return 0
    return s.background_nice


def copies(name: str, s: Settings) -> list[str]:
    """The processes of a service `up` runs, by name: `actors`, `actors-2`, ... as
    `SMARTHOME_ACTOR_PROCESSES` says (they share the partitions of device events); one of
    every other service."""
    count = s.actor_processes if name == "actors" else 1
    return [name] + [f"{name}-{n}" for n in range(2, count + 1)]


def _monitoring(child: str, api_url: str) -> tuple[dict[str, str], str]:
    """A service's environment for its status (`/system/services`) and where its metrics
    are: a worker serves `/health/*` and `/metrics` on a free loopback port of its own;
    the gateway serves them beside its API. The instance is the host's name (the same
    after a restart), with the copy's number for a service run more than once."""
    _, dash, copy = child.rpartition("-")
    instance = socket.gethostname() + (f"-{copy}" if dash and copy.isdigit() else "")
    env = {service_status.INSTANCE_ENV: instance}
    if child == "gateway":
        return env, f"{api_url}/metrics"
    port = embedded_nats.free_port()
    env |= {"SMARTHOME_HEALTH_PORT": str(port), "SMARTHOME_HTTP_HOST": LOOPBACK}
    return env, f"http://{LOOPBACK}:{port}/metrics"


def bus_store(s: Settings) -> int:
    """The embedded bus's storage limit for a start: SMARTHOME_NATS_MAX_STORE, or `auto`
    measured now (`embedded_nats.max_store`)."""
    if s.nats_max_store is not None:
        return s.nats_max_store
    return embedded_nats.max_store(embedded_nats.store_dir(s.data_dir))


def server_store(data_dir: Path, wanted: int) -> int:
    """The limit the server is given: `wanted`, unless the streams' budgets reserve that
    much already (made for a larger store): nats-server refuses to create or change any
    stream while they reserve more than its limit, so it keeps the store they were made
    for until the gateway has lowered them to `wanted`'s; the next start gets `wanted`."""
    reserved = embedded_nats.reserved(embedded_nats.store_dir(data_dir))
    if reserved < wanted:  # a store lowered within the headroom the budgets leave
        return wanted
    made_for = math.ceil(reserved / bus.BUDGETED_SHARE)
    log.warning(
        "the streams' budgets were made for a %d-byte bus store: it keeps that size until "
        "the gateway has lowered them to a %d-byte store's (the next start)",
        made_for,
        wanted,
    )
    return made_for


async def _start_bus(s: Settings, port: int, mqtt_port: int) -> tuple[Child, int]:
    """Start the embedded bus; with the storage limit it was started with, which the
    services are told (`child_env`)."""
    # Its monitoring port, on loopback, for the launcher's health watch only.
    monitor_port = embedded_nats.free_port()
    wanted: list[int] = []  # each start's: the config is written again at each

    def write_config() -> Path:
        wanted.append(bus_store(s))
        return embedded_nats.write_config(
            s.data_dir,
            port,
            sync=s.nats_sync,
            mqtt_port=mqtt_port,
            max_file_store=server_store(s.data_dir, wanted[-1]),
            monitor_port=monitor_port,
            auth=bus_auth.embedded_authorization(s.data_dir / BUS_DIR),
            tls=(s.nats_tls_cert, s.nats_tls_key) if s.nats_tls_cert and s.nats_tls_key else None,
        )

    argv = [embedded_nats.binary(), "-c", str(write_config())]
    server = Child("nats-server", argv, dict(os.environ), s.data_dir / "logs" / "nats-server.log")
    server.before_start = write_config
    # The full check: `?js-enabled-only=true` still answers ok while every write fails.
    server.health_url = f"http://127.0.0.1:{monitor_port}/healthz"
    await server.start()
    await asyncio.to_thread(embedded_nats.wait_for_server, port, mqtt_port)
    return server, wanted[-1]


def _mqtt_address(s: Settings, mqtt_port: int) -> str:
    """Where devices connect over MQTT, or why they cannot."""
    if s.nats_url:
        return "not started: NATS_URL is set (MQTT is that server's listener, if it has one)"
    if not mqtt_port:
        return "off (SMARTHOME_MQTT_PORT=0)"
    return f"mqtt://127.0.0.1:{mqtt_port}"


async def _ready(
    api_url: str, token: str, with_demo: bool, demo_for: float, stop: asyncio.Event
) -> bool:
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
        await demo.install_locations(api_url, token)
        log.info("demo rule %s", await demo.install_rule(api_url, token, demo_for))
    return True


def _banner(api_url: str, nats_url: str, mqtt: str, s: Settings, metrics: dict[str, str]) -> None:
    print(
        "\n"
        f"  smarthome is up\n"
        f"  UI        {api_url}/  (sign in as admin)\n"
        f"  API docs  {api_url}/schema  (an administrator's token)\n"
        f"  NATS      {nats_url}\n"
        f"  MQTT      {mqtt}\n"
        f"  data      {s.data_dir.resolve()}  (logs in {s.data_dir.resolve() / 'logs'})\n"
        f"  status    {api_url}{SERVICES_ROUTE}  (an administrator's token)\n"
        f"{_metrics_lines(metrics)}"
        f"  Ctrl-C stops everything.\n",
        flush=True,
    )


def _metrics_lines(metrics: dict[str, str]) -> str:
    """`metrics   <service>  <url>`, one line each (the gateway's asks for a token)."""
    width = max(map(len, metrics), default=0)
    lines = []
    for n, (name, url) in enumerate(metrics.items()):
        note = "  (an administrator's token)" if name == "gateway" else ""
        label = "metrics" if n == 0 else ""
        lines.append(f"  {label:<10}{name:<{width}}  {url}{note}\n")
    return "".join(lines)


def _first_admin(password: str) -> None:
    print(
        f"  First start: the user `admin` has the password {password}\n"
        "  It is shown this once and stored only hashed. Set SMARTHOME_ADMIN_PASSWORD before the\n"
        "  first start to choose it, or run `smarthome admin reset-password` to change it.\n",
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
    admin_p = sub.add_parser("admin", help="administer accounts from this machine")
    admin_sub = admin_p.add_subparsers(dest="admin_command", required=True)
    reset = admin_sub.add_parser(
        "reset-password", help="set a user's password (asked for, or read from stdin)"
    )
    reset.add_argument("--username", default="admin")
    reset.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    return p


def _reset_password(s: Settings, username: str, from_stdin: bool) -> int:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"new password for {username}: ")
        if getpass.getpass("again: ") != password:
            print("smarthome: the two passwords differ; nothing changed", file=sys.stderr)
            return 1
    if len(password) < MIN_PASSWORD_LENGTH:
        print(f"smarthome: a password needs {MIN_PASSWORD_LENGTH} characters", file=sys.stderr)
        return 1
    s.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(s.effective_database_url)
    if not asyncio.run(credentials.reset_password(s, username, password)):
        print(f"smarthome: no user {username!r}", file=sys.stderr)
        return 1
    print(f"smarthome: password of {username} set; its sessions are signed out")
    return 0


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="smarthome: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # its request lines are noise here
    try:
        s = settings_mod.load()
        if args.command == "migrate":
            s.data_dir.mkdir(parents=True, exist_ok=True)
            upgrade(s.effective_database_url)
            metrics_key = os.environ.get("SMARTHOME_METRICS_API_KEY") or None
            demo_key = os.environ.get("SMARTHOME_DEMO_API_KEY") or None
            asyncio.run(credentials.provision(s, metrics_key, demo_key))
            return
        if args.command == "admin":
            sys.exit(_reset_password(s, args.username, args.password_stdin))
        demo_for = args.demo_for if args.demo_for is not None else s.demo_rule_for_s
        with contextlib.suppress(KeyboardInterrupt):
            sys.exit(asyncio.run(up(s, not args.no_demo, demo_for)))
    except (settings_mod.SettingsError, StartError) as exc:
        print(f"smarthome: {exc}", file=sys.stderr)
        sys.exit(2)
    except (TimeoutError, RuntimeError) as exc:  # the system did not come up: say why, once
        print(f"smarthome: {exc}", file=sys.stderr)
        sys.exit(1)
