"""Servers a test may stop and start on purpose: a private Postgres and a private nats-server."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from libs import embedded_nats


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


class PrivatePostgres:
    """A throw-away cluster in a temp dir, owned by the `postgres` user when run as root."""

    def __init__(self) -> None:
        bindir = postgres_bin()
        if bindir is None:
            raise RuntimeError("PostgreSQL server binaries not found under /usr/lib/postgresql")
        self.bin = bindir
        # Its own directory under /tmp: pytest's are private to root, and initdb runs as postgres.
        root = Path(tempfile.mkdtemp(prefix="smarthome-pg-"))
        self.root = root
        self.dir = root / "pgdata"
        self.port = embedded_nats.free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        as_root = os.geteuid() == 0
        self._prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
        if as_root:
            shutil.chown(root, "postgres")
        self._run("initdb", "-D", str(self.dir), "-U", "postgres", "--auth=trust", "-N")

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self._prefix, str(self.bin / tool), *args],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def start(self) -> None:
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir}"
        self._run(
            "pg_ctl", "-D", str(self.dir), "-o", opts, "-w", "-l", str(self.dir / "log"), "start"
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        subprocess.run(
            [
                *self._prefix,
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.dir),
                "-m",
                "immediate",
                "stop",
            ],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(self.root, ignore_errors=True)


class PrivateNats:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = embedded_nats.free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = embedded_nats.start(self.root, self.port, self.root / "nats.log")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
