"""Cursor pagination: a page of items and an opaque cursor to the next page (keyset, stable
under concurrent inserts). The cursor is the sort key of the last item, base64url JSON."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, TypeVar

import msgspec
from litestar.params import QueryParameter

from libs.errors import Invalid

T = TypeVar("T")
K = TypeVar("K")
R = TypeVar("R")

CursorParam = Annotated[
    str | None,
    QueryParameter(description="`next_cursor` of the previous page", max_length=512),
]
SinceParam = Annotated[
    datetime | None,
    QueryParameter(description="ISO 8601 time; without a zone, UTC"),
]


class Page(msgspec.Struct, Generic[T]):
    items: list[T]
    next_cursor: str | None


def limit_param(default: int, maximum: int) -> Any:
    return QueryParameter(
        ge=1, le=maximum, description=f"page size (default {default}, max {maximum})"
    )


def encode_cursor(key: Any) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(key)).decode().rstrip("=")


def decode_cursor(cursor: str, key_type: type[K]) -> K:
    """The sort key in `cursor`; 422 naming `cursor` when it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        return msgspec.json.decode(raw, type=key_type)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise Invalid("not a cursor this API returned", field="cursor") from None


def page(rows: list[R], limit: int, key: Callable[[R], Any], view: Callable[[R], T]) -> Page[T]:
    """`rows` were fetched with `limit + 1`: the extra one says that a next page exists."""
    more = len(rows) > limit
    rows = rows[:limit]
    cursor = encode_cursor(key(rows[-1])) if more else None
    return Page(items=[view(r) for r in rows], next_cursor=cursor)


def utc(value: datetime | None) -> datetime | None:
    """Query times without a zone are UTC (the columns are zone-aware)."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)
