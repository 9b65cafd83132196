"""Signing in and staying signed in: the password grant, refresh-token rotation, logout, and
turning a bearer credential (access token or API key) into a `Principal`."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs.accounts import API_KEY_PREFIX
from libs.db.models import ApiKey, RefreshToken, User
from libs.passwords import digest, new_secret, verify_password
from libs.principals import Principal, PrincipalKind, Role
from services.gateway.auth.limits import LoginFailures
from services.gateway.auth.schemas import TokenPair
from services.gateway.auth.tokens import TokenError, Tokens

REFRESH_PREFIX = "shr_"
# A verified API key is trusted this long before the database is asked again: a revocation
# through this gateway takes effect at once, through another replica within this time.
KEY_CACHE_S = 30.0


def user_principal(user: User) -> Principal:
    return _principal(PrincipalKind.USER, user.username, user.role, user.homes)


def key_principal(key: ApiKey) -> Principal:
    return _principal(PrincipalKind.API_KEY, key.id, key.role, key.homes)


def _principal(kind: PrincipalKind, name: str, role_name: str, homes: list[str]) -> Principal:
    """An administrator sees every home, whatever its row lists."""
    role = Role(role_name)
    return Principal(
        kind=kind, id=name, role=role, homes=None if role is Role.ADMIN else frozenset(homes)
    )


class AuthService:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        tokens: Tokens,
        refresh_ttl_s: float,
    ) -> None:
        self._sessions = sessions
        self.tokens = tokens
        self._refresh_ttl = timedelta(seconds=refresh_ttl_s)
        self._failures = LoginFailures()
        self._keys: dict[str, tuple[Principal, float]] = {}  # key digest → (principal, until)

    async def login(self, username: str, password: str) -> TokenPair:
        self._failures.check(username)
        async with self._sessions() as session:
            user = await session.scalar(select(User).where(User.username == username))
        if not await verify_password(user.password_hash if user else None, password):
            self._failures.failed(username)
            raise TokenError("wrong user name or password")
        assert user is not None
        self._failures.succeeded(username)
        async with self._sessions.begin() as session:
            return await self._issue(session, user, family=new_secret())

    async def refresh(self, refresh_token: str) -> TokenPair:
        """A new pair for an unused refresh token; a used one revokes its whole family (it
        was stolen, or the client is confused: either way both copies must stop working)."""
        now = datetime.now(UTC)
        async with self._sessions.begin() as session:
            row = await session.get(RefreshToken, digest(refresh_token), with_for_update=True)
            if row is None or row.revoked_at is not None or row.expires_at <= now:
                raise TokenError("the refresh token is invalid, expired or revoked")
            if row.used_at is not None:
                await _revoke_family(session, row.family, now)
                # Committed although the request fails: the revocation must stand.
                await session.commit()
                raise TokenError("the refresh token was used already; the sign-in is revoked")
            row.used_at = now
            user = await session.get(User, row.user_id)
            if user is None:
                raise TokenError("the user no longer exists")
            return await self._issue(session, user, family=row.family)

    async def logout(self, refresh_token: str) -> None:
        async with self._sessions.begin() as session:
            row = await session.get(RefreshToken, digest(refresh_token))
            if row is not None:
                await _revoke_family(session, row.family, datetime.now(UTC))

    async def principal(self, credential: str) -> Principal:
        """Who a bearer credential names: an API key (cached once verified) or an access JWT."""
        if not credential.startswith(API_KEY_PREFIX):
            return self.tokens.read_access(credential)
        key_digest = digest(credential)
        cached = self._keys.get(key_digest)
        if cached and cached[1] > time.monotonic():
            return cached[0]
        async with self._sessions() as session:
            key = await session.scalar(select(ApiKey).where(ApiKey.key_hash == key_digest))
        now = datetime.now(UTC)
        if key is None or key.revoked_at or (key.expires_at and key.expires_at <= now):
            self._keys.pop(key_digest, None)
            raise TokenError("the API key is invalid, expired or revoked")
        principal = key_principal(key)
        until = time.monotonic() + KEY_CACHE_S
        if key.expires_at:
            until = min(until, time.monotonic() + (key.expires_at - now).total_seconds())
        self._keys[key_digest] = (principal, until)
        return principal

    def forget_keys(self) -> None:
        """Drop verified keys (one was revoked): the next use asks the database."""
        self._keys.clear()

    async def _issue(self, session: AsyncSession, user: User, family: str) -> TokenPair:
        refresh = new_secret(REFRESH_PREFIX)
        session.add(
            RefreshToken(
                token_hash=digest(refresh),
                family=family,
                user_id=user.id,
                expires_at=datetime.now(UTC) + self._refresh_ttl,
            )
        )
        return TokenPair(
            access_token=self.tokens.access(user_principal(user)),
            token_type="bearer",
            expires_in=self.tokens.access_ttl_s,
            refresh_token=refresh,
        )


async def revoke_sessions(session: AsyncSession, user_id: str) -> None:
    """End every sign-in of a user (password changed, user deleted)."""
    await session.execute(
        update(RefreshToken)
        .where(RefreshToken.user_id == user_id, RefreshToken.revoked_at.is_(None))
        .values(revoked_at=datetime.now(UTC))
    )


async def _revoke_family(session: AsyncSession, family: str, now: datetime) -> None:
    await session.execute(
        update(RefreshToken)
        .where(RefreshToken.family == family, RefreshToken.revoked_at.is_(None))
        .values(revoked_at=now)
    )
