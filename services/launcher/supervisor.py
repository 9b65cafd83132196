"""Child processes: start, restart with back-off when they die, stop in reverse order."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from libs import service_status

log = logging.getLogger("smarthome")

STOP_GRACE_S = 10.0
MAX_BACKOFF_S = 30.0
# A child that ran this long before dying starts again without waiting.
HEALTHY_RUN_S = 30.0
# A child with a health URL is asked this often; one that answered healthy since it started
# and then fails for UNHEALTHY_FOR_S is restarted (nats-server after a failed disk write).
HEALTH_EVERY_S = 5.0
UNHEALTHY_FOR_S = 30.0


def _in_child(nice: int) -> None:
    """Children get SIGTERM if the launcher itself dies (even by kill -9): no orphans. And
    `nice` more niceness than the launcher (every thread of theirs inherits it)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if nice:
        os.nice(nice)


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
    health_url: str | None = None
    # Run before each start (the bus writes its config again: its storage limit follows
    # the free disk).
    before_start: Callable[[], object] | None = None
    # Added to the launcher's niceness: work that can wait yields the CPU on a busy machine.
    nice: int = 0

    async def start(self) -> None:
        if self.before_start is not None:
            self.before_start()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it from here
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            # How often it was started before: a service reports it (`/system/services`).
            env={**self.env, service_status.RESTARTS_ENV: str(self.restarts)},
            stdout=out,
            stderr=out,
            stdin=asyncio.subprocess.DEVNULL,
            preexec_fn=functools.partial(_in_child, self.nice),
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

    async def watch_health(
        self, every: float = HEALTH_EVERY_S, unhealthy_for: float = UNHEALTHY_FOR_S
    ) -> None:
        """Restart the child when its health URL keeps failing (see UNHEALTHY_FOR_S); a
        start that never answers healthy is left to the child (it may be loading data)."""
        if self.health_url is None:
            return
        watched: asyncio.subprocess.Process | None = None
        healthy = False
        failing_since: float | None = None
        async with httpx.AsyncClient(timeout=every) as http:
            while not self.stopping:
                await asyncio.sleep(every)
                if self.proc is not watched:  # (re)started: wait for its first healthy answer
                    watched, healthy, failing_since = self.proc, False, None
                problem = await _health_problem(http, self.health_url)
                if problem is None:
                    healthy, failing_since = True, None
                    continue
                if not healthy or self.stopping:
                    continue
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since >= unhealthy_for:
                    log.warning(
                        "%s unhealthy for %.0fs (%s); restarting it",
                        self.name,
                        time.monotonic() - failing_since,
                        problem,
                    )
                    await self._end()  # keep_running starts it again
                    healthy, failing_since = False, None

    async def _end(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), STOP_GRACE_S)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


async def _health_problem(http: httpx.AsyncClient, url: str) -> str | None:
    """None when `url` answers 200, else what it said (or why it did not answer)."""
    try:
        response = await http.get(url)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if response.status_code == 200 else f"{response.status_code} {response.text}"


def python_module(module: str) -> list[str]:
    return [sys.executable, "-m", module]
