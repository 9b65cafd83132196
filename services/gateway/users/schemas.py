"""People (`/users`) and integrations (`/api-keys`): what is sent and what is answered."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec

from libs.messages import Name, Token, ZonedTime
from libs.principals import Role

Username = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.@-]{1,64}(?!\n)$")]
Password = Annotated[
    str, msgspec.Meta(min_length=8, max_length=256, description="at least 8 characters")
]
Homes = Annotated[
    list[Token],
    msgspec.Meta(max_length=100, description="ids of locations of kind `home`"),
]


class UserCreate(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    username: Username
    password: Password
    role: Role
    homes: Homes = []


class UserUpdate(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Every field optional. People change their own password (with `current_password`);
    only an administrator changes a role or homes."""

    password: Password | None = None
    current_password: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    role: Role | None = None
    homes: Homes | None = None


class User(msgspec.Struct, frozen=True):
    id: str
    username: str
    role: Role
    homes: list[str]
    created_at: datetime
    updated_at: datetime


class UserPage(msgspec.Struct, frozen=True):
    items: list[User]
    next_cursor: str | None


class ApiKeyCreate(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A key for an integration: a role no higher than its maker's, some of its homes."""

    name: Name
    role: Role
    homes: Homes = []
    expires_at: ZonedTime | None = None


class ApiKey(msgspec.Struct, frozen=True):
    id: str
    name: str
    role: Role
    homes: list[str]
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCreated(msgspec.Struct, frozen=True):
    """`key` is shown this once: send it as `Authorization: Bearer <key>`."""

    id: str
    name: str
    role: Role
    homes: list[str]
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    key: str


class ApiKeyPage(msgspec.Struct, frozen=True):
    items: list[ApiKey]
    next_cursor: str | None
