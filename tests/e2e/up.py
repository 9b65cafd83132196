"""`smarthome up` as a child process, as a user starts it, on a data directory of the test's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx
import psutil

from tests.helpers import eventually

ADMIN_PASSWORD = "e2e-admin-password"


class Up:
    def __init__(
        self,
        data_dir: Path,
        http_port: int,
        nats_port: int,
        *args: str,
        admin_password: str | None = ADMIN_PASSWORD,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.api = f"http://127.0.0.1:{http_port}"
        # The first administrator's: a generated one is read from the banner by the test.
        self.admin_password = admin_password
        self._token: str | None = None
        self._token_at = 0.0
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
            # Every test and browser signs in from 127.0.0.1: the per-address limit (30 a
            # minute, for people; tests/integration/test_auth.py tests it) is not under test.
            SMARTHOME_LOGINS_PER_MINUTE="600",
        )
        env.pop("SMARTHOME_ADMIN_PASSWORD", None)
        if admin_password:
            env["SMARTHOME_ADMIN_PASSWORD"] = admin_password
        env.update(extra_env or {})
        # The cached token is renewed at half its life (a platform may give short-lived ones).
        self._token_for_s = float(env.get("SMARTHOME_ACCESS_TOKEN_TTL") or 900) / 2
        self.stderr = data_dir / "launcher.err"
        with open(self.stderr, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.launcher", "up", *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=err,
            )

    def login(self, username: str = "admin", password: str | None = None) -> str:
        """An access token, signed in as a user would (the password grant); by default the
        first administrator's."""
        password = password or self.admin_password
        assert password, "the generated password is on the banner: set admin_password"
        r = httpx.post(
            self.api + "/api/v1/auth/token",
            data={"username": username, "password": password},
            timeout=10,
        )
        assert r.status_code == 200, r.text
        return r.json()["access_token"]

    @property
    def headers(self) -> dict[str, str]:
        """The administrator's, with a token signed in for the caller and kept while fresh."""
        if self._token is None or time.monotonic() - self._token_at > self._token_for_s:
            self._token_at = time.monotonic()
            self._token = self.login()
        return {"Authorization": f"Bearer {self._token}"}

    def get(self, path: str, **params: object) -> httpx.Response:
        """A GET as admin; no answer in time is an AssertionError, which `eventually` retries
        (a loaded CI machine may be slow to answer one request, not to reach the state)."""
        try:
            return httpx.get(self.api + path, params=params, headers=self.headers, timeout=10)
        except httpx.TransportError as exc:
            raise AssertionError(f"GET {path}: {exc!r}") from exc

    def post(self, path: str, body: object) -> httpx.Response:
        return httpx.post(self.api + path, json=body, headers=self.headers, timeout=10)

    async def ready(self) -> None:
        async def answers() -> bool:
            assert self.proc.poll() is None, self.stderr.read_text()[-2000:]
            try:
                return httpx.get(self.api + "/health/ready", timeout=10).status_code == 200
            except httpx.HTTPError:
                return False

        await eventually(answers, timeout=60, interval=0.2)

    def stop(self) -> tuple[int, list[psutil.Process]]:
        children = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        _, alive = psutil.wait_procs(children, timeout=5)
        return code, alive
