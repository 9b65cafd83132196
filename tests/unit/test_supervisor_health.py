"""The launcher restarts a child whose health endpoint keeps failing after it answered healthy
(nats-server after a failed disk write: it does not recover by itself), and only then; each
start tells the child how often it was started before (its status reports it)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from libs.service_status import RESTARTS_ENV
from services.launcher.supervisor import Child
from tests.helpers import eventually


class Health:
    """A health endpoint that answers 200 or 503 as the test says."""

    def __init__(self) -> None:
        self.ok = True
        self.asked = 0
        self.port = 0

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        self.asked += 1
        status = "200 OK" if self.ok else "503 Service Unavailable"
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        writer.close()


@pytest.fixture
async def health() -> AsyncIterator[Health]:
    endpoint = Health()
    server = await asyncio.start_server(endpoint._answer, "127.0.0.1", 0)
    endpoint.port = server.sockets[0].getsockname()[1]
    yield endpoint
    server.close()


@pytest.fixture
async def child(tmp_path: Path, health: Health) -> AsyncIterator[Child]:
    sleeper = Child(
        "sleeper",
        [sys.executable, "-c", "import time; time.sleep(600)"],
        dict(os.environ),
        tmp_path / "sleeper.log",
        health_url=f"http://127.0.0.1:{health.port}/healthz",
    )
    await sleeper.start()
    tasks = [
        asyncio.create_task(sleeper.keep_running()),
        asyncio.create_task(sleeper.watch_health(every=0.05, unhealthy_for=0.5)),
    ]
    yield sleeper
    await sleeper.stop()
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_child_that_stays_unhealthy_is_restarted(child: Child, health: Health) -> None:
    assert child.proc is not None
    first = child.proc.pid
    await eventually(lambda: health.asked >= 2)  # it was seen healthy

    health.ok = False
    await eventually(lambda: child.restarts == 1 and child.proc and child.proc.pid != first)
    health.ok = True
    asked = health.asked
    await eventually(lambda: health.asked > asked + 20)  # healthy again for a while

    assert child.restarts == 1


async def test_a_short_failure_or_a_start_never_healthy_is_left_alone(
    child: Child, health: Health
) -> None:
    health.ok = False  # from its start: it may be loading its data
    await eventually(lambda: health.asked >= 20)  # 1 s: twice `unhealthy_for`
    health.ok = True
    await eventually(lambda: health.asked >= 25)
    health.ok = False  # briefly
    await eventually(lambda: health.asked >= 28)
    health.ok = True
    await eventually(lambda: health.asked >= 35)

    assert child.restarts == 0


async def test_each_start_tells_the_child_how_often_it_was_started_before(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    record = f"import os; open({str(starts)!r}, 'a').write(os.environ[{RESTARTS_ENV!r}] + ' ')"
    dies = Child("dies", [sys.executable, "-c", record], dict(os.environ), tmp_path / "dies.log")
    await dies.start()
    keeping = asyncio.create_task(dies.keep_running())
    try:
        await eventually(lambda: starts.exists() and starts.read_text().split()[:2] == ["0", "1"])
    finally:
        await dies.stop()
        keeping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeping
    assert dies.restarts >= 1
