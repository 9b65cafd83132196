"""`/api/v1/users` and `/api/v1/api-keys`: administrators manage people and integrations;
people read and change themselves (their password)."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, delete, get, patch, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, JSONBody
from litestar.status_codes import HTTP_204_NO_CONTENT

from libs.principals import Permission, Principal
from services.gateway.auth.context import Context, provide_context
from services.gateway.auth.guards import requires
from services.gateway.body import StrictBody
from services.gateway.pagination import CursorParam, limit_param
from services.gateway.resources import Resources
from services.gateway.users.schemas import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyPage,
    User,
    UserCreate,
    UserPage,
    UserUpdate,
)
from services.gateway.users.service import ApiKeyService, UserService

ADMIN = [requires(Permission.ADMINISTER)]


def provide_users(resources: NamedDependency[Resources]) -> UserService:
    return UserService(resources.sessions)


def provide_api_keys(resources: NamedDependency[Resources], state: State) -> ApiKeyService:
    return ApiKeyService(resources.sessions, state.auth)


class UserController(Controller):
    path = "/users"
    tags = ["users"]
    dependencies = {
        "users": Provide(provide_users, sync_to_thread=False),
        "ctx": Provide(provide_context, sync_to_thread=False),
    }

    @post(
        "/",
        dto=StrictBody[UserCreate],
        guards=ADMIN,
        operation_id="createUser",
        summary="Add a user",
    )
    async def create(
        self,
        users: NamedDependency[UserService],
        data: JSONBody[UserCreate],
        ctx: NamedDependency[Context],
    ) -> User:
        return await users.create(data, ctx)

    @get("/", guards=ADMIN, operation_id="listUsers", summary="List users")
    async def list_users(
        self,
        users: NamedDependency[UserService],
        cursor: CursorParam = None,
        limit: Annotated[int, limit_param(100, 500)] = 100,
    ) -> UserPage:
        return await users.list(limit, cursor)

    @get("/{user_id:str}", operation_id="getUser", summary="Get a user (oneself, or any as admin)")
    async def get_user(
        self,
        users: NamedDependency[UserService],
        principal: NamedDependency[Principal],
        user_id: FromPath[str],
    ) -> User:
        return await users.get(user_id, principal)

    @patch(
        "/{user_id:str}",
        dto=StrictBody[UserUpdate],
        operation_id="updateUser",
        summary="Change a user",
        description="An administrator changes anything; a user changes its own password "
        "(with `current_password`), which signs out its other sessions.",
    )
    async def update(
        self,
        users: NamedDependency[UserService],
        ctx: NamedDependency[Context],
        user_id: FromPath[str],
        data: JSONBody[UserUpdate],
    ) -> User:
        return await users.update(user_id, data, ctx)

    @delete(
        "/{user_id:str}",
        guards=ADMIN,
        operation_id="deleteUser",
        summary="Remove a user (and end its sessions)",
        status_code=HTTP_204_NO_CONTENT,
    )
    async def delete_user(
        self,
        users: NamedDependency[UserService],
        ctx: NamedDependency[Context],
        user_id: FromPath[str],
    ) -> None:
        await users.delete(user_id, ctx)


class ApiKeyController(Controller):
    path = "/api-keys"
    tags = ["users"]
    guards = ADMIN
    dependencies = {
        "api_keys": Provide(provide_api_keys, sync_to_thread=False),
        "ctx": Provide(provide_context, sync_to_thread=False),
    }

    @post(
        "/",
        dto=StrictBody[ApiKeyCreate],
        operation_id="createApiKey",
        summary="Make an API key (shown once)",
    )
    async def create(
        self,
        api_keys: NamedDependency[ApiKeyService],
        ctx: NamedDependency[Context],
        data: JSONBody[ApiKeyCreate],
    ) -> ApiKeyCreated:
        return await api_keys.create(data, ctx)

    @get("/", operation_id="listApiKeys", summary="List API keys (never their secrets)")
    async def list_keys(
        self,
        api_keys: NamedDependency[ApiKeyService],
        cursor: CursorParam = None,
        limit: Annotated[int, limit_param(100, 500)] = 100,
    ) -> ApiKeyPage:
        return await api_keys.list(limit, cursor)

    @delete(
        "/{key_id:str}",
        operation_id="revokeApiKey",
        summary="Revoke an API key",
        status_code=HTTP_204_NO_CONTENT,
    )
    async def revoke(
        self,
        api_keys: NamedDependency[ApiKeyService],
        ctx: NamedDependency[Context],
        key_id: FromPath[str],
    ) -> None:
        await api_keys.revoke(key_id, ctx)
