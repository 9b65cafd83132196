"""`/api/v1/audit`: HTTP only; the logic is in `service.py`."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, get
from litestar.di import NamedDependency, Provide
from litestar.params import QueryParameter

from libs.principals import Permission, Principal
from services.gateway.audit.schemas import AuditPage
from services.gateway.audit.service import AuditFilters, AuditService
from services.gateway.auth.guards import requires
from services.gateway.pagination import CursorParam, SinceParam, limit_param, utc
from services.gateway.problems import problem
from services.gateway.resources import Resources


def provide_audit_service(resources: NamedDependency[Resources]) -> AuditService:
    return AuditService(resources.sessions)


class AuditController(Controller):
    path = "/audit"
    tags = ["audit"]
    dependencies = {"audit": Provide(provide_audit_service, sync_to_thread=False)}

    @get(
        "/",
        guards=[requires(Permission.READ)],
        operation_id="listAudit",
        summary="The audit log, oldest first",
        description="Who did what, when, to which device, with what result: the rows about "
        "the caller's homes (their devices, rules, subscriptions and locations).",
        responses={404: problem("`device_id` names no device of the caller's homes")},
    )
    async def list_audit(
        self,
        audit: NamedDependency[AuditService],
        principal: NamedDependency[Principal],
        device_id: Annotated[str | None, QueryParameter(max_length=128)] = None,
        correlation_id: Annotated[str | None, QueryParameter(max_length=128)] = None,
        since: SinceParam = None,
        cursor: CursorParam = None,
        limit: Annotated[int, limit_param(100, 1000)] = 100,
    ) -> AuditPage:
        filters = AuditFilters(device_id=device_id, correlation_id=correlation_id, since=utc(since))
        return await audit.list(filters, limit, cursor, principal)
