"""Child processes: start, restart with back-off when they die, stop in reverse order."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("smarthome")

STOP_GRACE_S = 10.0
MAX_BACKOFF_S = 30.0
# A child that ran this long before dying starts again without waiting.
HEALTHY_RUN_S = 30.0


def _die_with_parent() -> None:
    """Children get SIGTERM if the launcher itself dies (even by kill -9): no orphans."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    started_at: float = 0.0
    stopping: bool = field(default=False)

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it from here
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            env=self.env,
            stdout=out,
            stderr=out,
            stdin=asyncio.subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        out.close()
        self.started_at = time.monotonic()
        log.info("started %s (pid %s, log %s)", self.name, self.proc.pid, self.log_path)

    async def stop(self) -> None:
        self.stopping = True
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), STOP_GRACE_S)
        except TimeoutError:
            log.warning("%s did not stop in %ss; killing it", self.name, STOP_GRACE_S)
            self.proc.kill()
            await self.proc.wait()
        log.info("stopped %s", self.name)

    async def keep_running(self) -> None:
        """Restart the child whenever it exits, until it is stopped on purpose."""
        backoff = 1.0
        while not self.stopping:
            assert self.proc is not None
            code = await self.proc.wait()
            if self.stopping:
                return
            if time.monotonic() - self.started_at > HEALTHY_RUN_S:
                backoff = 1.0
            self.restarts += 1
            log.warning(
                "%s exited with code %s; restarting in %.0fs (restart #%d, see %s)",
                self.name,
                code,
                backoff,
                self.restarts,
                self.log_path,
            )
            await asyncio.sleep(backoff)
            if self.stopping:
                return
            await self.start()
            backoff = min(backoff * 2, MAX_BACKOFF_S)


def python_module(module: str) -> list[str]:
    return [sys.executable, "-m", module]
