"""`smarthome up` as a child process, as a user starts it, on a data directory of the test's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil

from tests.helpers import eventually


class Up:
    def __init__(self, data_dir: Path, http_port: int, nats_port: int, *args: str) -> None:
        self.api = f"http://127.0.0.1:{http_port}"
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("DATABASE_URL", "REDIS_URL", "NATS_URL")
        }
        env.update(
            SMARTHOME_DATA_DIR=str(data_dir),
            SMARTHOME_HTTP_PORT=str(http_port),
            SMARTHOME_NATS_PORT=str(nats_port),
            SMARTHOME_DEMO_RULE_FOR="3",
        )
        self.stderr = data_dir / "launcher.err"
        with open(self.stderr, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.launcher", "up", *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=err,
            )

    def get(self, path: str, **params: object) -> httpx.Response:
        """A GET; no answer in time is an AssertionError, which `eventually` retries (a
        loaded CI machine may be slow to answer one request, not to reach the state)."""
        try:
            return httpx.get(self.api + path, params=params, timeout=10)
        except httpx.TransportError as exc:
            raise AssertionError(f"GET {path}: {exc!r}") from exc

    async def ready(self) -> None:
        async def answers() -> bool:
            assert self.proc.poll() is None, self.stderr.read_text()[-2000:]
            try:
                return self.get("/health/ready").status_code == 200
            except httpx.HTTPError:
                return False

        await eventually(answers, timeout=60, interval=0.2)

    def stop(self) -> tuple[int, list[psutil.Process]]:
        children = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        _, alive = psutil.wait_procs(children, timeout=5)
        return code, alive
