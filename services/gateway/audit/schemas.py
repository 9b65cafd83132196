"""Audit bodies."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

import msgspec

from libs.audit_chain import ActorKind


class AuditPrincipal(msgspec.Struct, frozen=True):
    """Who acted: a user, an API key, a device, a rule or one of the platform's services."""

    kind: ActorKind
    id: str


class AuditItem(msgspec.Struct, frozen=True):
    """Who (`principal`, also as `actor`: `user:alice`) did what (`action`), when, to what
    (`target`, `device_id`), with what result and why, under which correlation id, caused by
    which event (`cause_id`). `hash` chains it to the row before it (`GET /audit/verify`)."""

    id: int
    time: datetime
    recorded_at: datetime
    actor: str
    principal: AuditPrincipal
    action: str
    target: str | None
    device_id: str | None
    result: str
    reason: str | None
    correlation_id: str | None
    cause_id: str | None
    detail: dict[str, Any]
    hash: str


class AuditPage(msgspec.Struct, frozen=True):
    """A page of audit entries, oldest first; `next_cursor` continues it."""

    items: list[AuditItem]
    next_cursor: str | None


class AuditBadRow(msgspec.Struct, frozen=True):
    """The first row (or retention checkpoint, by the row it cut after) that does not hold."""

    id: int
    reason: str


class AuditVerdict(msgspec.Struct, frozen=True):
    """Whether the chain holds from its start (or the last retention checkpoint) to its end."""

    ok: bool
    checked: int
    first_bad: AuditBadRow | None


class ExportFormat(StrEnum):
    NDJSON = "ndjson"
    CSV = "csv"
