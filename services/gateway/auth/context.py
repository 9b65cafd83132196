"""Who acted and why, as one small value: the principal and the request's correlation id."""

from __future__ import annotations

from dataclasses import dataclass

from litestar import Request

from libs.principals import Principal
from services.gateway.correlation import provide_correlation_id


@dataclass(frozen=True)
class Context:
    principal: Principal
    correlation_id: str


def provide_context(request: Request[Principal, object, object]) -> Context:
    return Context(principal=request.user, correlation_id=provide_correlation_id(request))
