"""The audit log, as the recorder wrote it from the bus (read-only here)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs.db.models import AuditEntry
from libs.db.models import Device as DeviceRow
from libs.errors import NotFound
from libs.principals import Principal, home_of
from services.gateway import scope
from services.gateway.audit.schemas import AuditItem, AuditPage
from services.gateway.pagination import decode_cursor, page


@dataclass(frozen=True)
class AuditFilters:
    device_id: str | None = None
    correlation_id: str | None = None
    since: datetime | None = None


class AuditService:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def list(
        self, filters: AuditFilters, limit: int, cursor: str | None, principal: Principal
    ) -> AuditPage:
        """Oldest first from `since` (inclusive); the cursor pages forward in time. The rows
        about the principal's homes (`scope.audit`); asked for a device it does not see, 404
        as for one that is not registered."""
        query = select(AuditEntry).order_by(AuditEntry.time, AuditEntry.id).limit(limit + 1)
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
        if filters.since:
            query = query.where(AuditEntry.time >= filters.since)
        if cursor:
            time, last_id = decode_cursor(cursor, tuple[datetime, int])
            query = query.where(
                or_(AuditEntry.time > time, and_(AuditEntry.time == time, AuditEntry.id > last_id))
            )
        async with self._sessions() as session:
            rows = list(await session.scalars(query))
        return page(rows, limit, key=lambda r: (r.time, r.id), view=_item, into=AuditPage)


def _item(row: AuditEntry) -> AuditItem:
    return AuditItem(
        id=row.id,
        time=row.time,
        actor=row.actor,
        action=row.action,
        device_id=row.device_id,
        result=row.result,
        correlation_id=row.correlation_id,
        detail=row.detail or {},
    )
