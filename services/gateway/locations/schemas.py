"""Location bodies: what a user sends (`LocationCreate`, `LocationUpdate`) and what the API
answers (`Location`, `LocationPage`)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

from libs.messages import Name, Token

LocationKind = Literal["home", "floor", "room"]


class LocationCreate(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A home (no parent), a floor (in a home) or a room (in a home or on a floor); without
    `id` one is generated. Its `path` (`home/ground/kitchen`) is what devices name as their
    `location`."""

    name: Name
    kind: LocationKind
    id: Token | None = None
    parent_id: Token | None = None


class LocationUpdate(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Rename a location (its id and path stay: devices name the path)."""

    name: Name


class Location(msgspec.Struct, frozen=True):
    id: str
    name: str
    kind: LocationKind
    parent_id: str | None
    path: str
    created_at: datetime


class LocationPage(msgspec.Struct, frozen=True):
    """A page of locations in path order (a home, then what is in it); `next_cursor`
    continues it."""

    items: list[Location]
    next_cursor: str | None
