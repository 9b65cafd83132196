"""Auth payloads: the OAuth2 password grant (RFC 6749 §4.3) and what it answers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import msgspec

from libs.principals import Role


@dataclass
class TokenRequest:
    """`application/x-www-form-urlencoded`, as OAuth2 clients send it."""

    username: str
    password: str
    grant_type: str = "password"


class RefreshRequest(msgspec.Struct, forbid_unknown_fields=True):
    refresh_token: str = msgspec.field()


class TokenPair(msgspec.Struct, frozen=True):
    access_token: str
    token_type: Literal["bearer"]
    expires_in: int
    refresh_token: str


class StreamTicket(msgspec.Struct, frozen=True):
    """Put it in the URL of `/events/stream` or `/events/ws` as `ticket`: it works once,
    within `expires_in` seconds."""

    ticket: str
    expires_in: int


class Me(msgspec.Struct, frozen=True):
    kind: str
    id: str
    actor: str
    role: Role
    homes: list[str] | None
    permissions: list[str]
