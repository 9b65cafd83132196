"""Where the CLI finds the gateway and its credentials.

`smarthome login` keeps the gateway's URL, the access token and the refresh token in
`$XDG_CONFIG_HOME/smarthome/credentials.json` (`~/.config/...` without it), readable by its
owner only. `SMARTHOME_URL` and `SMARTHOME_TOKEN` override what is stored (a CI job, an API
key); a stored access token that has expired is traded for a new one with the refresh token.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

URL_ENV = "SMARTHOME_URL"
TOKEN_ENV = "SMARTHOME_TOKEN"
API_PREFIX = "/api/v1"
# A token this close to its expiry is refreshed first: the request must not race it.
EXPIRY_MARGIN_S = 30.0


class Credentials(msgspec.Struct):
    """What `smarthome login` stored."""

    url: str
    username: str
    access_token: str
    refresh_token: str
    expires_at: float  # seconds since the epoch

    @property
    def expired(self) -> bool:
        return time.time() > self.expires_at - EXPIRY_MARGIN_S


@dataclass
class Target:
    """The gateway a command talks to, and with what: `stored` when the token came from
    `smarthome login` (and may be refreshed), None when it came from the environment."""

    url: str
    token: str
    stored: Credentials | None = None


def normalize_url(url: str) -> str:
    """`host:8000`, `http://host:8000/` and `http://host:8000/api/v1` all name the same
    gateway: `http://host:8000`."""
    url = url.strip()
    if "://" not in url:
        url = f"http://{url}"
    url = url.rstrip("/")
    return url.removesuffix(API_PREFIX).rstrip("/")


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "smarthome"


def credentials_path() -> Path:
    return config_dir() / "credentials.json"


def load() -> Credentials | None:
    """The stored credentials; None when there are none (or they are not ours to read)."""
    try:
        return msgspec.json.decode(credentials_path().read_bytes(), type=Credentials)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def save(credentials: Credentials) -> Path:
    """Write the credentials, mode 0600 from the first byte (never readable by others)."""
    path = credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = path.with_suffix(".tmp")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(msgspec.json.format(msgspec.json.encode(credentials)))
    os.chmod(partial, 0o600)  # an existing file keeps its mode through O_CREAT
    partial.replace(path)
    return path


def forget() -> bool:
    """Remove the stored credentials; whether there were any."""
    try:
        credentials_path().unlink()
    except FileNotFoundError:
        return False
    return True


@contextlib.contextmanager
def refreshing() -> Iterator[None]:
    """Held while a refresh token is traded: it works once, so two commands running at the
    same time must not both present it (the second would sign the login out)."""
    path = config_dir() / "credentials.lock"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def target() -> Target | None:
    """Where to send requests, and with which token; None when neither the environment nor
    a login says."""
    stored = load()
    url = os.environ.get(URL_ENV)
    token = os.environ.get(TOKEN_ENV)
    if url:
        url = normalize_url(url)
    if token:
        base = url or (stored.url if stored else None)
        return Target(base, token) if base else None
    if stored is None or (url and url != stored.url):
        return None  # no token, or one for another gateway
    return Target(stored.url, stored.access_token, stored)
