"""The audit log, as the recorder wrote it from the bus (read-only here): the list, its
export, and the check of its hash chain."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import msgspec
from sqlalchemy import Select, and_, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import audit_chain
from libs.db import audit
from libs.db.models import AuditEntry
from libs.db.models import Device as DeviceRow
from libs.errors import Invalid, NotFound
from libs.principals import Principal, home_of
from services.gateway import scope
from services.gateway.audit.schemas import (
    AuditBadRow,
    AuditItem,
    AuditPage,
    AuditPrincipal,
    AuditVerdict,
    ExportFormat,
)
from services.gateway.pagination import decode_cursor, page

EXPORT_CHUNK = 1000
NewestFirst = Literal["desc"]
CSV_COLUMNS = (
    "id",
    "time",
    "recorded_at",
    "actor",
    "principal_kind",
    "principal_id",
    "action",
    "target",
    "device_id",
    "result",
    "reason",
    "correlation_id",
    "cause_id",
    "detail",
    "hash",
)


@dataclass(frozen=True)
class AuditFilters:
    device_id: str | None = None
    correlation_id: str | None = None
    actor: str | None = None
    action: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        if self.since and self.until and self.until < self.since:
            raise Invalid("`until` is before `since`", field="until")


class AuditService:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], key: bytes) -> None:
        self._sessions = sessions
        self._key = key

    async def list(
        self,
        filters: AuditFilters,
        limit: int,
        cursor: str | None,
        principal: Principal,
        newest_first: bool = False,
    ) -> AuditPage:
        """Oldest first (or `newest_first`) from `since` (inclusive) to `until` (exclusive);
        the cursor pages on in the same order. The rows about the principal's homes
        (`scope.audit`); asked for a device it does not see, 404 as for one that is not
        registered."""
        query = await self._query(filters, principal)
        key: Callable[[AuditEntry], tuple[Any, ...]]
        if newest_first:
            query = query.order_by(AuditEntry.time.desc(), AuditEntry.id.desc())
            if cursor:
                time, last_id, _ = decode_cursor(cursor, tuple[datetime, int, NewestFirst])
                query = _before(query, (time, last_id))
            key = _newest_first_key
        else:
            query = query.order_by(AuditEntry.time, AuditEntry.id)
            if cursor:
                query = _after(query, decode_cursor(cursor, tuple[datetime, int]))
            key = _oldest_first_key
        async with self._sessions() as session:
            rows = list(await session.scalars(query.limit(limit + 1)))
        return page(rows, limit, key=key, view=item, into=AuditPage)

    async def export(
        self, filters: AuditFilters, format: ExportFormat, principal: Principal
    ) -> AsyncIterator[bytes]:
        """What `list` pages through, all of it, as NDJSON lines or CSV rows; read a chunk
        at a time (no transaction stays open while the client reads)."""
        query = await self._query(filters, principal)
        return self._export(query.order_by(AuditEntry.time, AuditEntry.id), format)

    async def _export(self, query: Select[Any], format: ExportFormat) -> AsyncIterator[bytes]:
        if format is ExportFormat.CSV:
            yield _csv_line(CSV_COLUMNS)
        last: tuple[datetime, int] | None = None
        while True:
            chunk = query if last is None else _after(query, last)
            async with self._sessions() as session:
                rows = list(await session.scalars(chunk.limit(EXPORT_CHUNK)))
            if rows:
                items = [item(r) for r in rows]
                if format is ExportFormat.CSV:
                    yield b"".join(_csv_line(_csv_values(i)) for i in items)
                else:
                    yield b"".join(msgspec.json.encode(i) + b"\n" for i in items)
                last = (rows[-1].time, rows[-1].id)
            if len(rows) < EXPORT_CHUNK:
                return

    async def verify(self) -> AuditVerdict:
        verdict = await audit.verify(self._sessions, self._key)
        bad = verdict.first_bad
        return AuditVerdict(
            ok=verdict.ok,
            checked=verdict.checked,
            first_bad=AuditBadRow(bad.id, bad.reason) if bad else None,
        )

    async def _query(self, filters: AuditFilters, principal: Principal) -> Select[Any]:
        """The rows the filters select, unordered."""
        query = select(AuditEntry)
        query = scope.audit(principal, query)
        if filters.device_id and not principal.is_admin:
            async with self._sessions() as session:
                row = await session.get(DeviceRow, filters.device_id)
            missing = f"device {filters.device_id!r} is not registered"
            if row is None:
                raise NotFound(missing)
            scope.visible(principal, home_of(row.location), missing)
        if filters.device_id:
            query = query.where(AuditEntry.device_id == filters.device_id)
        if filters.correlation_id:
            query = query.where(AuditEntry.correlation_id == filters.correlation_id)
        if filters.actor:
            query = query.where(AuditEntry.actor == filters.actor)
        if filters.action:
            query = query.where(AuditEntry.action == filters.action)
        if filters.since:
            query = query.where(AuditEntry.time >= filters.since)
        if filters.until:
            query = query.where(AuditEntry.time < filters.until)
        return query


def _after(query: Select[Any], key: tuple[datetime, int]) -> Select[Any]:
    time, last_id = key
    return query.where(
        or_(AuditEntry.time > time, and_(AuditEntry.time == time, AuditEntry.id > last_id))
    )


def _before(query: Select[Any], key: tuple[datetime, int]) -> Select[Any]:
    time, last_id = key
    return query.where(
        or_(AuditEntry.time < time, and_(AuditEntry.time == time, AuditEntry.id < last_id))
    )


def _oldest_first_key(row: AuditEntry) -> tuple[datetime, int]:
    return (row.time, row.id)


def _newest_first_key(row: AuditEntry) -> tuple[datetime, int, NewestFirst]:
    """A newest-first page's cursor says so: given with the other order, it is refused
    (422) rather than read as a place in it."""
    return (row.time, row.id, "desc")


def item(row: AuditEntry) -> AuditItem:
    kind, ident = audit_chain.principal_of(row.actor)
    return AuditItem(
        id=row.id,
        time=row.time,
        recorded_at=row.recorded_at,
        actor=row.actor,
        principal=AuditPrincipal(kind, ident),
        action=row.action,
        target=row.target,
        device_id=row.device_id,
        result=row.result,
        reason=row.reason,
        correlation_id=row.correlation_id,
        cause_id=row.cause_id,
        detail=row.detail or {},
        hash=row.hash,
    )


def _csv_values(i: AuditItem) -> tuple[Any, ...]:
    return (
        i.id,
        i.time.isoformat(),
        i.recorded_at.isoformat(),
        i.actor,
        i.principal.kind,
        i.principal.id,
        i.action,
        i.target or "",
        i.device_id or "",
        i.result,
        i.reason or "",
        i.correlation_id or "",
        i.cause_id or "",
        json.dumps(i.detail, sort_keys=True, separators=(",", ":")),
        i.hash,
    )


# A cell a spreadsheet would run as a formula (OWASP "CSV injection"): quoted with a `'`.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def _csv_line(values: tuple[Any, ...]) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerow([_cell(v) for v in values])
    return out.getvalue().encode()
