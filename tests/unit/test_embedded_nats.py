"""The embedded nats-server's environment: a soft memory limit for its Go runtime (issue 17)."""

from __future__ import annotations

from pathlib import Path

import httpx

from libs import embedded_nats


def test_server_env_sets_the_memory_limit_and_keeps_the_rest() -> None:
    env = embedded_nats.server_env({"PATH": "/usr/bin", "GOGC": "80"})

    assert env == {"PATH": "/usr/bin", "GOGC": "80", "GOMEMLIMIT": embedded_nats.MEMORY_LIMIT}


def test_server_env_keeps_a_memory_limit_already_set() -> None:
    env = embedded_nats.server_env({"GOMEMLIMIT": "1GiB"})

    assert env["GOMEMLIMIT"] == "1GiB"


def test_started_server_runs_under_the_memory_limit(tmp_path: Path) -> None:
    port, monitor = embedded_nats.free_port(), embedded_nats.free_port()
    proc = embedded_nats.start(tmp_path / "nats", port, monitor_port=monitor)
    try:
        embedded_nats.wait_for_port("127.0.0.1", monitor, proc)
        varz = httpx.get(f"http://127.0.0.1:{monitor}/varz", timeout=5).json()
    finally:
        proc.terminate()
        proc.wait(10)

    assert varz["gomemlimit"] == int(embedded_nats.MEMORY_LIMIT.removesuffix("MiB")) * 2**20
