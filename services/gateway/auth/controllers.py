"""`/api/v1/auth/*` and `/api/v1/me`: signing in, refreshing, signing out, who am I."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.enums import RequestEncodingType
from litestar.params import Body, JSONBody
from litestar.status_codes import HTTP_200_OK, HTTP_204_NO_CONTENT

from libs.principals import ROLE_PERMISSIONS, Principal
from services.gateway.auth.schemas import Me, RefreshRequest, StreamTicket, TokenPair, TokenRequest
from services.gateway.auth.service import AuthService
from services.gateway.auth.tokens import TICKET_TTL_S, TokenError
from services.gateway.body import StrictBody


def provide_auth(state: State) -> AuthService:
    auth: AuthService = state.auth  # the lifespan's (`create_app`)
    return auth


class AuthController(Controller):
    path = "/auth"
    tags = ["auth"]

    @post(
        "/token",
        operation_id="createToken",
        summary="Sign in (OAuth2 password grant)",
        description="A form (`username`, `password`, `grant_type=password`); answers a "
        "15-minute access token and a refresh token that works once.",
        status_code=HTTP_200_OK,
        opt={"form": True},
    )
    async def token(
        self,
        auth: NamedDependency[AuthService],
        data: Annotated[TokenRequest, Body(media_type=RequestEncodingType.URL_ENCODED)],
    ) -> TokenPair:
        if data.grant_type != "password":
            raise TokenError("grant_type must be `password`")
        return await auth.login(data.username, data.password)

    @post(
        "/refresh",
        dto=StrictBody[RefreshRequest],
        operation_id="refreshToken",
        summary="Trade a refresh token for a new pair",
        description="Each refresh token works once; presenting a used one signs out every "
        "token of that sign-in.",
        status_code=HTTP_200_OK,
    )
    async def refresh(
        self, auth: NamedDependency[AuthService], data: JSONBody[RefreshRequest]
    ) -> TokenPair:
        return await auth.refresh(data.refresh_token)

    @post(
        "/logout",
        dto=StrictBody[RefreshRequest],
        operation_id="logout",
        summary="Sign out: revoke the sign-in's refresh tokens",
        status_code=HTTP_204_NO_CONTENT,
    )
    async def logout(
        self, auth: NamedDependency[AuthService], data: JSONBody[RefreshRequest]
    ) -> None:
        await auth.logout(data.refresh_token)

    @post(
        "/stream-ticket",
        operation_id="createStreamTicket",
        summary="A single-use ticket for a live stream",
        description="For clients that cannot send headers (a browser's EventSource or "
        "WebSocket): `GET /events/stream?ticket=…` within 30 s, once.",
        status_code=HTTP_200_OK,
    )
    async def stream_ticket(
        self, auth: NamedDependency[AuthService], principal: NamedDependency[Principal]
    ) -> StreamTicket:
        return StreamTicket(ticket=auth.tokens.ticket(principal), expires_in=TICKET_TTL_S)


@get("/me", operation_id="getMe", summary="Who the caller is", tags=["auth"])
async def me(principal: NamedDependency[Principal]) -> Me:
    return Me(
        kind=principal.kind.value,
        id=principal.id,
        actor=principal.actor,
        role=principal.role,
        homes=None if principal.homes is None else sorted(principal.homes),
        permissions=sorted(ROLE_PERMISSIONS[principal.role]),
    )
