"""People and integrations: users with a role and homes; API keys no stronger than their
maker. Secrets are stored only hashed and shown once."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import messages as m
from libs import subjects
from libs.accounts import new_api_key
from libs.db.models import ApiKey as ApiKeyRow
from libs.db.models import Location
from libs.db.models import User as UserRow
from libs.errors import Conflict, Invalid, NotFound
from libs.passwords import hash_password, verify_password
from libs.principals import Principal, Role, at_most
from services.gateway.auth.context import Context
from services.gateway.auth.service import AuthService, revoke_sessions
from services.gateway.changes import Change, record_change
from services.gateway.pagination import keyset, page
from services.gateway.users.schemas import (
    ApiKey,
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyPage,
    User,
    UserCreate,
    UserPage,
    UserUpdate,
)


class UserService:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def create(self, data: UserCreate, ctx: Context) -> User:
        async with self._sessions.begin() as session:
            homes = await _homes(session, data.role, data.homes)
            if await session.scalar(select(UserRow.id).where(UserRow.username == data.username)):
                raise Conflict(f"user {data.username!r} exists", field="$.username")
            row = UserRow(
                id=m.new_id(),
                username=data.username,
                password_hash=await hash_password(data.password),
                role=data.role.value,
                homes=homes,
                created_at=m.now(),
                updated_at=m.now(),
            )
            session.add(row)
            self._told(session, row, "created", ctx)
        return _user(row)

    async def list(self, limit: int, cursor: str | None) -> UserPage:
        query = keyset(select(UserRow), UserRow.username, limit, cursor)
        async with self._sessions() as session:
            rows = list(await session.scalars(query))
        return page(rows, limit, key=lambda r: r.username, view=_user, into=UserPage)

    async def get(self, user_id: str, by: Principal) -> User:
        async with self._sessions() as session:
            return _user(await _visible(session, user_id, by))

    async def update(self, user_id: str, data: UserUpdate, ctx: Context) -> User:
        by = ctx.principal
        async with self._sessions.begin() as session:
            row = await _visible(session, user_id, by)
            if not by.is_admin:
                await _own_change(row, data)
            if data.role is not None or data.homes is not None:
                role = data.role or Role(row.role)
                homes = await _homes(session, role, row.homes if data.homes is None else data.homes)
                if row.role == Role.ADMIN and role is not Role.ADMIN:
                    await _keep_an_admin(session)
                row.role, row.homes = role.value, homes
            if data.password is not None:
                row.password_hash = await hash_password(data.password)
                await revoke_sessions(session, row.id)
            row.updated_at = m.now()
            self._told(session, row, "updated", ctx, password_changed=data.password is not None)
        return _user(row)

    async def delete(self, user_id: str, ctx: Context) -> None:
        async with self._sessions.begin() as session:
            row = await session.get(UserRow, user_id)
            if row is None:
                raise NotFound(f"no user {user_id!r}")
            if row.role == Role.ADMIN:
                await _keep_an_admin(session)
            await revoke_sessions(session, row.id)
            await session.delete(row)
            self._told(session, row, "deleted", ctx)

    def _told(
        self,
        session: AsyncSession,
        row: UserRow,
        change: Change,
        ctx: Context,
        *,
        password_changed: bool = False,
    ) -> None:
        detail = {"username": row.username, "role": row.role, "homes": list(row.homes)}
        if password_changed:
            detail["password"] = "changed"
        record_change(
            session,
            subjects.user_changed(row.id),
            "user",
            row.id,
            change,
            actor=ctx.principal.actor,
            correlation_id=ctx.correlation_id,
            detail=detail,
        )


class ApiKeyService:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], auth: AuthService) -> None:
        self._sessions = sessions
        self._auth = auth

    async def create(self, data: ApiKeyCreate, ctx: Context) -> ApiKeyCreated:
        by = ctx.principal
        if not at_most(data.role, by.role):
            raise Invalid(
                f"a key may not have more rights than its maker ({by.role})", field="$.role"
            )
        outside = sorted(h for h in data.homes if not by.sees(h))
        if outside:
            raise Invalid(f"not homes of yours: {', '.join(outside)}", field="$.homes")
        if data.expires_at is not None and data.expires_at <= datetime.now(UTC):
            raise Invalid("must be in the future", field="$.expires_at")
        async with self._sessions.begin() as session:
            homes = await _homes(session, data.role, data.homes)
            key, row = new_api_key(data.name, data.role, homes, by.actor, data.expires_at)
            session.add(row)
            self._told(session, row, "created", ctx)
        return ApiKeyCreated(**msgspec.structs.asdict(_key(row)), key=key)

    async def list(self, limit: int, cursor: str | None) -> ApiKeyPage:
        query = keyset(select(ApiKeyRow), ApiKeyRow.id, limit, cursor)
        async with self._sessions() as session:
            rows = list(await session.scalars(query))
        return page(rows, limit, key=lambda r: r.id, view=_key, into=ApiKeyPage)

    async def revoke(self, key_id: str, ctx: Context) -> None:
        async with self._sessions.begin() as session:
            row = await session.get(ApiKeyRow, key_id)
            if row is None:
                raise NotFound(f"no API key {key_id!r}")
            row.revoked_at = row.revoked_at or m.now()
            self._told(session, row, "revoked", ctx)
        self._auth.forget_keys()

    def _told(self, session: AsyncSession, row: ApiKeyRow, change: Change, ctx: Context) -> None:
        """The fact that every gateway hears (and forgets the keys it verified) and the
        recorder audits; never the key."""
        record_change(
            session,
            subjects.api_key_changed(row.id),
            "apikey",
            row.id,
            change,
            actor=ctx.principal.actor,
            correlation_id=ctx.correlation_id,
            detail={"name": row.name, "role": row.role, "homes": list(row.homes)},
        )


async def _visible(session: AsyncSession, user_id: str, by: Principal) -> UserRow:
    """A user an administrator may see, or oneself; anyone else's is a 404."""
    row = await session.get(UserRow, user_id)
    if row is None or not (by.is_admin or (by.kind == "user" and row.username == by.id)):
        raise NotFound(f"no user {user_id!r}")
    return row


async def _own_change(row: UserRow, data: UserUpdate) -> None:
    if data.role is not None or data.homes is not None:
        field = "$.role" if data.role is not None else "$.homes"
        raise Invalid("only an administrator changes a role or homes", field=field)
    if data.password is not None and not await verify_password(
        row.password_hash, data.current_password or ""
    ):
        raise Invalid("the current password is wrong", field="$.current_password")


async def _homes(session: AsyncSession, role: Role, homes: list[str]) -> list[str]:
    """The homes, each a defined location of kind `home`; an administrator has them all."""
    if role is Role.ADMIN:
        return []
    known = set(
        await session.scalars(
            select(Location.id).where(Location.id.in_(homes), Location.kind == "home")
        )
    )
    for index, home in enumerate(homes):
        if home not in known:
            raise Invalid(f"{home!r} is not a location of kind home", field=f"$.homes[{index}]")
    return sorted(set(homes))


async def _keep_an_admin(session: AsyncSession) -> None:
    admins = await session.scalar(select(func.count()).where(UserRow.role == Role.ADMIN.value))
    if (admins or 0) <= 1:
        raise Conflict("the last administrator cannot be removed or demoted")


def _user(row: UserRow) -> User:
    return User(
        id=row.id,
        username=row.username,
        role=Role(row.role),
        homes=list(row.homes),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _key(row: ApiKeyRow) -> ApiKey:
    return ApiKey(
        id=row.id,
        name=row.name,
        role=Role(row.role),
        homes=list(row.homes),
        created_by=row.created_by,
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
    )
