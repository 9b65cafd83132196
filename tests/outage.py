"""Servers a test may stop and start on purpose: a private Postgres, nats-server and Redis."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import redis

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
    def __init__(self, root: Path, max_file_store: int | None = None) -> None:
        self.root = root
        self.port = embedded_nats.free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.max_file_store = max_file_store
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = embedded_nats.start(
            self.root, self.port, self.root / "nats.log", max_file_store=self.max_file_store
        )

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(10)

    @classmethod
    @contextlib.contextmanager
    def running(cls, root: Path, max_file_store: int | None = None) -> Iterator[PrivateNats]:
        """A server of the test's own while the block runs (a store of `max_file_store`)."""
        server = cls(root, max_file_store)
        server.start()
        try:
            yield server
        finally:
            server.stop()


class PrivateRedis:
    """A redis-server of its own on a free loopback port, saving snapshots (`dump.rdb`) in
    `root` as Redis does out of the box; a test may kill it, flush it, or restart it from
    an older snapshot."""

    def __init__(self, root: Path) -> None:
        found = shutil.which("redis-server")
        if found is None:
            raise RuntimeError("redis-server not found")
        self.binary = found
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = embedded_nats.free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--dir", str(self.root), "--dbfilename", "dump.rdb", "--appendonly", "no"]
        with open(self.root / "redis.log", "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        embedded_nats.wait_for_port("127.0.0.1", self.port, self.proc)  # type: ignore[arg-type]

    def snapshot(self, name: str) -> Path:
        """SAVE now, and keep a copy of that snapshot as `name`."""
        with redis.Redis.from_url(self.url) as client:
            client.save()
        return Path(shutil.copy(self.root / "dump.rdb", self.root / name))

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def restart_from(self, snapshot: Path) -> None:
        """Start again from an older snapshot, as after a crash and a restore."""
        shutil.copy(snapshot, self.root / "dump.rdb")
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
