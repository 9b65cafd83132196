"""A device's heartbeat file and the probe that reads it: the demo devices serve no HTTP, so
Kubernetes asks them how they are with `python -m devices.probe live|ready FILE MAX_AGE`.

The device (devices/platform_link.py) rewrites the file every few seconds while its event
loop turns, with the time the bus last acknowledged one of its messages:

- `live`: the file was written within MAX_AGE seconds (the device's loop is alive);
- `ready`: the bus acknowledged the device within MAX_AGE seconds (it is connected).

Exit status 0 when so, else 1 with the reason on one line (the kubelet shows it in the pod's
events). Times are wall-clock seconds: the device and the probe are separate processes.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from enum import StrEnum
from pathlib import Path

import msgspec


class Check(StrEnum):
    LIVE = "live"
    READY = "ready"


class Heartbeat(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the file holds: when it was written, and when the bus last acknowledged us."""

    written_at: float
    bus_acked_at: float | None = None


_decoder = msgspec.json.Decoder(Heartbeat)


def heartbeat_file() -> Path | None:
    """Where to write the heartbeat (`SMARTHOME_DEVICE_HEARTBEAT_FILE`); unset: nowhere."""
    path = os.environ.get("SMARTHOME_DEVICE_HEARTBEAT_FILE")
    return Path(path) if path else None


def write(path: Path, beat: Heartbeat) -> None:
    """Replace the file at once (a probe never reads half of it)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(msgspec.json.encode(beat))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def verdict(check: Check, beat: Heartbeat | None, max_age: float, now: float) -> str | None:
    """None when the check passes, else why not."""
    if beat is None:
        return "no heartbeat yet"
    if check is Check.LIVE:
        at, what = beat.written_at, "heartbeat written"
    elif beat.bus_acked_at is None:
        return "the bus has acknowledged nothing yet"
    else:
        at, what = beat.bus_acked_at, "the bus last acknowledged us"
    age = now - at
    return None if age <= max_age else f"{what} {age:.0f}s ago (at most {max_age:g}s)"


def read(path: Path) -> Heartbeat | None:
    try:
        return _decoder.decode(path.read_bytes())
    except FileNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    usage = "usage: python -m devices.probe live|ready FILE MAX_AGE_SECONDS"
    try:
        if len(args) != 3:
            raise ValueError(args)
        check, path, max_age = Check(args[0]), Path(args[1]), float(args[2])
    except ValueError:
        print(usage, file=sys.stderr)
        return 2
    try:
        why = verdict(check, read(path), max_age, time.time())
    except (OSError, msgspec.DecodeError) as exc:
        why = f"unreadable heartbeat file {path}: {exc}"
    if why:
        print(f"{check}: {why}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
