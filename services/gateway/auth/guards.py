"""Function-level checks: a route names the permission it needs; a role without it is 403."""

from __future__ import annotations

from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.exceptions import PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.types import Guard

from libs.principals import Permission, Principal
from services.gateway.auth.tokens import TokenError


def requires(permission: Permission) -> Guard:
    # Async: Litestar would run a plain function on a worker thread, per request.
    async def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        # The auth middleware lets OPTIONS through (a CORS preflight carries no credential),
        # and a controller's guards still run for it: without a principal, refuse.
        principal: Principal | None = connection.scope.get("user")
        if principal is None:
            raise TokenError("authentication required: send `Authorization: Bearer <token>`")
        if not principal.can(permission):
            raise PermissionDeniedException(
                detail=f"the {principal.role} role may not do this ({permission} is needed)"
            )

    return guard


def provide_principal(request: Request[Principal, Any, Any]) -> Principal:
    """The caller, for handlers that take `principal: Principal`."""
    return request.user
