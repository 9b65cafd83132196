"""The actors' memory of who may report: an event sent right after an approval is applied.

The memory learns each change from its registry fact, a moment after the change is committed;
a standing that refuses events is read again from the database before they are refused."""

from __future__ import annotations

from typing import Any

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs.actor_batch import Standing
from libs.cache import MemoryCache
from libs.db.models import Device
from services.actors import store as store_module
from services.actors.cache_writer import CacheWriter
from services.actors.committer import Committer
from services.actors.store import StateStore
from tests.factories import add_devices


def memory(sessions: async_sessionmaker[AsyncSession]) -> StateStore:
    return StateStore(sessions, CacheWriter(MemoryCache()), Committer(sessions))


async def set_lifecycle(sessions: Any, device_id: str, lifecycle: str) -> None:
    async with sessions.begin() as session:
        await session.execute(
            update(Device).where(Device.id == device_id).values(lifecycle=lifecycle)
        )


async def test_an_approval_committed_before_its_fact_arrives_is_read(sessions: Any) -> None:
    [porch] = await add_devices(sessions, lifecycle="pending", enabled=True)
    store = memory(sessions)
    assert await store.registry([porch]) == {porch: Standing.PENDING}

    await set_lifecycle(sessions, porch, "active")  # approved; its registry fact not yet here

    assert await store.registry([porch]) == {porch: Standing.ACTIVE}


async def test_a_refused_standing_is_read_again_at_most_once_a_second(
    sessions: Any, monkeypatch: Any
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(store_module.time, "monotonic", lambda: clock[0])
    [porch] = await add_devices(sessions, lifecycle="pending", enabled=True)
    store = memory(sessions)
    store.learn(porch, Standing.PENDING)
    assert await store.registry([porch]) == {porch: Standing.PENDING}  # read

    await set_lifecycle(sessions, porch, "active")
    clock[0] += store_module.RECHECK_S / 2
    assert await store.registry([porch]) == {porch: Standing.PENDING}  # not read again yet
    clock[0] += store_module.RECHECK_S / 2
    assert await store.registry([porch]) == {porch: Standing.ACTIVE}


async def test_a_fact_learned_while_reading_is_the_newer_word(sessions: Any) -> None:
    [porch] = await add_devices(sessions, lifecycle="pending", enabled=True)
    store = memory(sessions)
    store.learn(porch, Standing.PENDING)
    read = store._entries

    async def disconnected_meanwhile(device_ids: list[str]) -> Any:
        found = await read(device_ids)  # pending, as committed when read
        store.learn(porch, Standing.DISCONNECTED)  # a later change's fact
        return found

    store._entries = disconnected_meanwhile  # type: ignore[method-assign]

    assert await store.registry([porch]) == {porch: Standing.DISCONNECTED}
