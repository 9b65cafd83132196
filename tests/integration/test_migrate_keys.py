"""`smarthome migrate` registers the API keys Kubernetes hands out (no launcher there)."""

from __future__ import annotations

import secrets

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs.db.models import ApiKey
from libs.passwords import digest
from libs.settings import Settings
from services.launcher import credentials, demo


async def test_migrate_registers_the_demo_devices_key_as_an_installer_of_the_demo_home(
    settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    key = "shk_" + secrets.token_hex(20)

    await credentials.provision(settings, None, key)
    await credentials.provision(settings, None, key)  # every upgrade runs it again

    async with sessions() as session:
        rows = list(await session.scalars(select(ApiKey).where(ApiKey.key_hash == digest(key))))
    assert [(r.role, r.homes, r.revoked_at) for r in rows] == [("installer", [demo.HOME_ID], None)]
