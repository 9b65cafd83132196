"""`/api/v1/audit`: HTTP only; the logic is in `service.py`."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from litestar import Controller, Request, get
from litestar.di import NamedDependency, Provide
from litestar.params import QueryParameter
from litestar.response import Stream

from libs.db.audit import checkpoint_key
from libs.errors import Invalid
from libs.principals import Permission, Principal
from services.gateway.audit.schemas import AuditPage, AuditVerdict, ExportFormat
from services.gateway.audit.service import AuditFilters, AuditService
from services.gateway.auth.guards import requires
from services.gateway.pagination import CursorParam, SinceParam, limit_param, utc
from services.gateway.problems import answers, problem
from services.gateway.resources import Resources

FILTERS = ("device_id", "correlation_id", "actor", "action", "since", "until")
MEDIA_TYPES = {ExportFormat.NDJSON: "application/x-ndjson", ExportFormat.CSV: "text/csv"}

Text = Annotated[str | None, QueryParameter(max_length=200)]
OrderParam = Annotated[
    Literal["asc", "desc"],
    QueryParameter(
        description="`asc` (default): oldest first; `desc`: newest first. A cursor pages on "
        "in the order of the page that gave it"
    ),
]
UntilParam = Annotated[
    datetime | None,
    QueryParameter(description="ISO 8601 time, exclusive; without a zone, UTC"),
]


def provide_audit_service(resources: NamedDependency[Resources]) -> AuditService:
    return AuditService(resources.sessions, checkpoint_key(resources.settings))


def _only(request: Request[Any, Any, Any], *names: str) -> None:
    """422 naming the first query parameter the route does not know (a misspelt filter would
    otherwise widen the answer silently)."""
    for name in request.query_params:
        if name not in names:
            raise Invalid(f"not a filter of the audit log (known: {', '.join(names)})", field=name)


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
        request: Request[Principal, Any, Any],
        audit: NamedDependency[AuditService],
        principal: NamedDependency[Principal],
        device_id: Annotated[str | None, QueryParameter(max_length=128)] = None,
        correlation_id: Annotated[str | None, QueryParameter(max_length=128)] = None,
        actor: Text = None,
        action: Annotated[str | None, QueryParameter(max_length=128)] = None,
        since: SinceParam = None,
        until: UntilParam = None,
        cursor: CursorParam = None,
        limit: Annotated[int, limit_param(100, 1000)] = 100,
        order: OrderParam = "asc",
    ) -> AuditPage:
        _only(request, *FILTERS, "cursor", "limit", "order")
        filters = AuditFilters(device_id, correlation_id, actor, action, utc(since), utc(until))
        return await audit.list(filters, limit, cursor, principal, newest_first=order == "desc")

    @get(
        "/export",
        guards=[requires(Permission.ADMINISTER)],
        operation_id="exportAudit",
        opt=answers(*MEDIA_TYPES.values()),
        response_description="The rows: NDJSON, or CSV with `format=csv`",
        summary="The audit log as NDJSON or CSV, streamed",
        description="Every row the list's filters select, oldest first, without paging: "
        "NDJSON (one list item per line) or CSV (a header row; `detail` as JSON).",
    )
    async def export_audit(
        self,
        request: Request[Principal, Any, Any],
        audit: NamedDependency[AuditService],
        principal: NamedDependency[Principal],
        format: Annotated[
            ExportFormat, QueryParameter(description="`ndjson` (default) or `csv`")
        ] = ExportFormat.NDJSON,
        device_id: Annotated[str | None, QueryParameter(max_length=128)] = None,
        correlation_id: Annotated[str | None, QueryParameter(max_length=128)] = None,
        actor: Text = None,
        action: Annotated[str | None, QueryParameter(max_length=128)] = None,
        since: SinceParam = None,
        until: UntilParam = None,
    ) -> Stream:
        _only(request, *FILTERS, "format")
        filters = AuditFilters(device_id, correlation_id, actor, action, utc(since), utc(until))
        rows = await audit.export(filters, format, principal)
        extension = format.value
        return Stream(
            rows,
            media_type=MEDIA_TYPES[format],
            headers={"Content-Disposition": f'attachment; filename="audit.{extension}"'},
        )

    @get(
        "/verify",
        guards=[requires(Permission.ADMINISTER)],
        operation_id="verifyAudit",
        summary="Check the audit log's hash chain",
        description="Walks the chain from its start, or from the last retention checkpoint "
        "(whose signature is checked), and names the first row that was edited, inserted "
        "or follows a deleted one.",
    )
    async def verify_audit(self, audit: NamedDependency[AuditService]) -> AuditVerdict:
        return await audit.verify()
