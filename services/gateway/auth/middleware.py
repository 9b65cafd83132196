"""Every request needs a principal, except what `PUBLIC` lists.

A bearer credential in `Authorization` (an access JWT or an API key); for the live streams
only, a single-use `ticket` query parameter instead (a browser's EventSource and WebSocket
cannot send headers). Nothing is read from cookies: the browser holds no ambient authority
a foreign page could borrow.
"""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult

from services.gateway.auth.service import AuthService
from services.gateway.auth.tokens import TokenError

# Anchored patterns (Litestar searches them): probes, signing in, and the UI's static page.
PUBLIC = [
    r"^/health/",
    r"^/api/v1/auth/token$",
    r"^/api/v1/auth/refresh$",
    r"^/$",
    r"^/ui/",
]
# Where a stream ticket stands in for the header.
STREAM_PATHS = ("/api/v1/events/stream", "/api/v1/events/ws")


class AuthMiddleware(AbstractAuthenticationMiddleware):
    async def authenticate_request(
        self, connection: ASGIConnection[Any, Any, Any, Any]
    ) -> AuthenticationResult:
        auth: AuthService = connection.app.state.auth
        header = connection.headers.get("authorization")
        if header:
            scheme, _, credential = header.partition(" ")
            if scheme.lower() != "bearer" or not credential.strip():
                raise TokenError("use `Authorization: Bearer <token or API key>`")
            principal = await auth.principal(credential.strip())
            return AuthenticationResult(user=principal, auth=credential)
        ticket = connection.query_params.get("ticket")
        if ticket and connection.scope["path"] in STREAM_PATHS:
            return AuthenticationResult(user=auth.tokens.redeem_ticket(ticket), auth=ticket)
        raise TokenError("authentication required: send `Authorization: Bearer <token>`")
