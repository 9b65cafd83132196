"""Things a test needs in the registry, made one way: through the API as a client would
(`register_device`, `define_location`), or straight into the database as the gateway stores
them (`add_devices`) when the test is about a worker and not the API."""

from __future__ import annotations

from typing import Any

from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs.db.models import Device
from tests.helpers import unique_id

DEVICES = "/api/v1/devices"
LOCATIONS = "/api/v1/locations"


async def register_device(
    client: AsyncTestClient, *, kind: str = "light", name: str = "Lamp", **fields: Any
) -> dict[str, Any]:
    """`POST /devices` with a fresh id (unless `fields` name one); the created device."""
    body = {"id": unique_id(), "name": name, "kind": kind, **fields}
    response = await client.post(DEVICES, json=body)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def define_location(
    client: AsyncTestClient, kind: str, parent: str | None = None
) -> dict[str, Any]:
    """`POST /locations`: a home, or a floor or room under `parent`; the created location."""
    body = {"id": unique_id(kind), "name": f"The {kind}", "kind": kind}
    if parent:
        body["parent_id"] = parent
    response = await client.post(LOCATIONS, json=body)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def add_devices(
    sessions: async_sessionmaker[AsyncSession],
    *device_ids: str,
    kind: str = "sensor",
    count: int = 1,
    **columns: Any,
) -> list[str]:
    """Registry rows as the gateway writes them (`lifecycle`, `enabled`, `location`...):
    for the ids given, or for `count` fresh ids of `kind`; their ids."""
    ids = list(device_ids) or [unique_id(kind) for _ in range(count)]
    async with sessions.begin() as session:
        session.add_all([Device(id=d, name=d, kind=kind, **columns) for d in ids])
    return ids
