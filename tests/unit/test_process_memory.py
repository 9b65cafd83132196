"""A process gives back the memory of a sign-in's password hash (a 19 MiB Argon2 block)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# A fresh process (the allocator's state is the process's): its RSS before and after a
# password is hashed and checked from threads, as the gateway does.
HASHING = """
import asyncio
from libs import passwords, runtime

def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

async def main():
    if GIVE_BACK:
        runtime.give_back_large_blocks()
    before = rss_mb()
    hashed = await passwords.hash_password("correct horse battery")
    await asyncio.gather(*(passwords.verify_password("not the one", hashed) for _ in range(4)))
    print(rss_mb() - before)

asyncio.run(main())
"""


def grown_mb(give_back: bool) -> float:
    script = f"GIVE_BACK = {give_back}\n{HASHING}"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    return float(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; glibc's knob")
def test_a_processes_rss_does_not_keep_a_hashed_passwords_memory() -> None:
    assert grown_mb(give_back=True) < 5.0  # 19 MiB kept without it
