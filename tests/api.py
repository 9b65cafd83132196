"""Authenticated clients of the gateway: tests act as a principal like any API client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar.testing import AsyncTestClient

from libs.settings import Settings
from services.gateway.app import create_app


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@asynccontextmanager
async def api_client(settings: Settings, token: str) -> AsyncIterator[AsyncTestClient]:
    """The gateway in-process, every request carrying `token`."""
    async with AsyncTestClient(create_app(settings)) as client:
        client.headers.update(bearer(token))
        yield client
