"""Accounts made outside the API: the first administrator, a password reset from the terminal,
and the API keys the launcher gives itself and the demo devices."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import messages as m
from libs.db.models import ApiKey, RefreshToken, User
from libs.passwords import digest, hash_password, new_secret
from libs.principals import Role

ADMIN_USERNAME = "admin"
API_KEY_PREFIX = "shk_"


async def ensure_admin(
    sessions: async_sessionmaker[AsyncSession], password: str | None
) -> str | None:
    """Create `admin` when there is no user yet, with `password` or a generated one;
    returns the generated password (to be shown once), else None."""
    async with sessions.begin() as session:
        if await session.scalar(select(User.id).limit(1)) is not None:
            return None
        generated = None if password else secrets.token_urlsafe(12)
        session.add(
            User(
                id=m.new_id(),
                username=ADMIN_USERNAME,
                password_hash=await hash_password(password or generated or ""),
                role=Role.ADMIN.value,
                homes=[],
                created_at=m.now(),
                updated_at=m.now(),
            )
        )
    return generated


async def reset_password(
    sessions: async_sessionmaker[AsyncSession], username: str, password: str
) -> bool:
    """Set a user's password and end its sessions; False when there is no such user."""
    async with sessions.begin() as session:
        user = await session.scalar(select(User).where(User.username == username))
        if user is None:
            return False
        user.password_hash = await hash_password(password)
        user.updated_at = m.now()
        for token in await session.scalars(
            select(RefreshToken).where(RefreshToken.user_id == user.id)
        ):
            token.revoked_at = token.revoked_at or m.now()
    return True


async def issue_api_key(
    sessions: async_sessionmaker[AsyncSession],
    name: str,
    role: Role,
    homes: list[str],
    created_by: str,
) -> str:
    """A new API key (its secret returned, its digest stored)."""
    key, row = new_api_key(name, role, homes, created_by)
    async with sessions.begin() as session:
        session.add(row)
    return key


def new_api_key(
    name: str,
    role: Role,
    homes: list[str],
    created_by: str,
    expires_at: datetime | None = None,
) -> tuple[str, ApiKey]:
    """A fresh key's secret, and the row that keeps only its digest."""
    key = new_secret(API_KEY_PREFIX)
    row = ApiKey(
        id="k-" + m.new_id()[:12],
        name=name,
        key_hash=digest(key),
        role=role.value,
        homes=homes,
        created_by=created_by,
        expires_at=expires_at,
        created_at=m.now(),
    )
    return key, row


async def ensure_api_key(
    sessions: async_sessionmaker[AsyncSession],
    name: str,
    role: Role,
    key: str,
    homes: Sequence[str] = (),
) -> None:
    """Register a key whose secret comes from outside (a Kubernetes Secret), once."""
    if not key.startswith(API_KEY_PREFIX) or len(key) < 36:
        raise ValueError(f"the {name} API key must start with {API_KEY_PREFIX} and be long")
    async with sessions.begin() as session:
        if await session.scalar(select(ApiKey.id).where(ApiKey.key_hash == digest(key))):
            return
        # A new secret for the same name (rotated in the Secret): the old key stops working.
        for old in await session.scalars(
            select(ApiKey).where(ApiKey.name == name, ApiKey.created_by == "platform:migrate")
        ):
            old.revoked_at = old.revoked_at or m.now()
        session.add(
            ApiKey(
                id=f"k-{name}-{digest(key)[:8]}"[:64],
                name=name,
                key_hash=digest(key),
                role=role.value,
                homes=list(homes),
                created_by="platform:migrate",
                created_at=m.now(),
            )
        )


async def usable(sessions: async_sessionmaker[AsyncSession], key: str) -> bool:
    async with sessions() as session:
        row = await session.scalar(select(ApiKey).where(ApiKey.key_hash == digest(key)))
    return row is not None and row.revoked_at is None


async def local_keys(
    sessions: async_sessionmaker[AsyncSession],
    path: Path,
    wanted: dict[str, tuple[Role, list[str]]],
) -> dict[str, str]:
    """The launcher's own API keys, kept in `path` (mode 0600): made on first start, made
    again when one was revoked."""
    keys: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}  # noqa: ASYNC240
    changed = False
    for name, (role, homes) in wanted.items():
        if name not in keys or not await usable(sessions, keys[name]):
            keys[name] = await issue_api_key(sessions, name, role, homes, "platform:launcher")
            changed = True
    if changed:
        write_private(path, json.dumps(keys, indent=2))
    return keys


def write_private(path: Path, content: str) -> None:
    """Write a file only its owner may read (mode 0600 from the start)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(content)
    path.chmod(0o600)
