"""Start the platform's services as real processes for integration tests."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

from libs import bus_grants, embedded_nats


class Service:
    """`python -m <module>` with a probe port; stopped by SIGTERM (or killed on purpose)."""

    def __init__(self, module: str, env: dict[str, str], log_dir: Path) -> None:
        self.module = module
        self.health_port = embedded_nats.free_port()
        self.env = {**env, **_identity(module, env), "SMARTHOME_HEALTH_PORT": str(self.health_port)}
        self.log_path = log_dir / f"{module}.{uuid.uuid4().hex[:8]}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Service:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module], env=self.env, stdout=out, stderr=out
            )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.health_port}/health/ready"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.module} exited {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.module} not ready within {timeout}s: {self.tail()}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.terminate()
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            return -9

    def tail(self, n: int = 3000) -> str:
        return self.log()[-n:]

    def log(self) -> str:
        """Everything it logged: what to search (a chatty process pushes a line out of
        the tail before a test looks)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _identity(module: str, env: dict[str, str]) -> dict[str, str]:
    """A platform service connects as itself (its password in the session's data dir, where
    the session's nats-server took the hashes from); anything else as the caller says."""
    package, _, name = module.partition(".")
    if package != "services" or name not in bus_grants.SERVICE_USERS:
        return {}
    if bus_grants.ENV_USER in env or "SMARTHOME_DATA_DIR" not in env:
        return {}
    passwords = bus_grants.ensure_service_passwords(Path(env["SMARTHOME_DATA_DIR"]) / "bus")
    return bus_grants.service_env(passwords, name)
