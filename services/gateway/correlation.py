"""One correlation id per request: taken from `X-Correlation-Id` or made up, returned in the
response header, bound to every log line, and put on every message the request causes."""

from __future__ import annotations

import re

import structlog
from litestar import Request
from litestar.datastructures import Headers, MutableScopeHeaders
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from libs import messages as m

HEADER = "X-Correlation-Id"
STATE_KEY = "correlation_id"
# Ids travel in NATS headers, rows and CloudEvents: keep them short and plain.
_VALID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class CorrelationMiddleware(ASGIMiddleware):
    scopes = (ScopeType.HTTP,)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        given = Headers.from_scope(scope).get(HEADER)
        # An unusable id is replaced rather than refused: the response header says which it is.
        correlation_id = given if given and _VALID.fullmatch(given) else m.new_id()
        scope.setdefault("state", {})[STATE_KEY] = correlation_id

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableScopeHeaders.from_message(message)[HEADER] = correlation_id
            await send(message)

        with structlog.contextvars.bound_contextvars(correlation_id=correlation_id):
            await next_app(scope, receive, send_with_header)


def provide_correlation_id(request: Request) -> str:
    return request.state.get(STATE_KEY) or m.new_id()
