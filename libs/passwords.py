"""Secrets at rest: Argon2id for passwords people choose, SHA-256 for the random ones we mint.

A password is guessable, so it gets a slow, memory-hard hash (argon2-cffi's defaults:
RFC 9106's second recommendation). Refresh tokens and API keys carry 256 random bits: a
fast digest is as safe for them and lets every request be checked without Argon2.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

# OWASP's Argon2id configuration (19 MiB, 2 passes, 1 lane): tens of milliseconds here, and
# a burst of sign-ins cannot take the gateway's memory (64 MiB each with the library's
# defaults). Hashes keep their parameters, so older ones still verify.
_hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
# At most this many hashes at once: the rest wait their turn instead of taking every core.
_slots = asyncio.Semaphore(4)

# Verified against when the user does not exist, so that a wrong name takes as long as a
# wrong password (no user enumeration by timing).
_DECOY = _hasher.hash(secrets.token_urlsafe(16))

MIN_PASSWORD_LENGTH = 8


async def hash_password(password: str) -> str:
    async with _slots:
        return await asyncio.to_thread(_hasher.hash, password)


async def verify_password(password_hash: str | None, password: str) -> bool:
    """Whether `password` matches; off the event loop (tens of milliseconds by design)."""
    async with _slots:
        return await asyncio.to_thread(_verify, password_hash or _DECOY, password, password_hash)


def _verify(stored: str, password: str, real: str | None) -> bool:
    try:
        _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False
    return real is not None


def new_secret(prefix: str = "") -> str:
    """A fresh random secret (256 bits), with a prefix that says what it is."""
    return prefix + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
