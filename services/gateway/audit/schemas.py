"""Audit bodies."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec


class AuditItem(msgspec.Struct, frozen=True):
    """Who (`actor`) did what (`action`), when, to which device, with what result."""

    id: int
    time: datetime
    actor: str
    action: str
    device_id: str | None
    result: str
    correlation_id: str | None
    detail: dict[str, Any]


class AuditPage(msgspec.Struct, frozen=True):
    """A page of audit entries, oldest first; `next_cursor` continues it."""

    items: list[AuditItem]
    next_cursor: str | None
