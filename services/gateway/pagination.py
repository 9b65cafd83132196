"""Cursor pagination: a page of items and an opaque cursor to the next page (keyset, stable
under concurrent inserts). The cursor is the sort key of the last item, base64url JSON.

Each list has its own page type (`DevicePage`: `{"items": [...], "next_cursor": ...}`), so
that the API reference names what the items are.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import msgspec
from litestar.params import ParameterKwarg, QueryParameter
from sqlalchemy import Select

from libs.errors import Invalid

T = TypeVar("T")
K = TypeVar("K")
R = TypeVar("R")
P = TypeVar("P")
Q = TypeVar("Q", bound="Select[Any]")

CursorParam = Annotated[
    str | None,
    QueryParameter(description="`next_cursor` of the previous page", max_length=512),
]
SinceParam = Annotated[
    datetime | None,
    QueryParameter(description="ISO 8601 time; without a zone, UTC"),
]


def limit_param(default: int, maximum: int) -> ParameterKwarg:
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


def keyset(query: Q, column: Any, limit: int, cursor: str | None) -> Q:
    """`query` ordered by a unique text `column`, one row more than `limit` (it says a next
    page exists), starting after the cursor's key."""
    query = query.order_by(column).limit(limit + 1)
    return query.where(column > decode_cursor(cursor, str)) if cursor else query


def page(
    rows: list[R],
    limit: int,
    *,
    key: Callable[[R], Any],
    view: Callable[[R], T],
    into: Callable[[list[T], str | None], P],
) -> P:
    """A page of `view(row)`s; `rows` were fetched with `limit + 1`, and the extra one says
    that a next page exists, which starts after `key` of the page's last row."""
    more = len(rows) > limit
    rows = rows[:limit]
    return into([view(r) for r in rows], encode_cursor(key(rows[-1])) if more else None)


def utc(value: datetime | None) -> datetime | None:
    """Query times without a zone are UTC (the columns are zone-aware)."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)
