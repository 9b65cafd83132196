"""Hot device state: Redis when REDIS_URL is set, else an in-process dict (write-through)."""

from __future__ import annotations

from typing import Protocol

import redis.asyncio as redis

KEY_PREFIX = "smarthome:device-state:"


class StateCache(Protocol):
    async def get(self, device_id: str) -> bytes | None: ...
    async def get_many(self, device_ids: list[str]) -> dict[str, bytes]: ...
    async def put_many(self, states: dict[str, bytes]) -> None: ...
    async def delete(self, device_id: str) -> None: ...
    async def ping(self) -> bool: ...
    async def close(self) -> None: ...


class MemoryCache:
    """The embedded default: lives only in the process that holds it."""

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}

    async def get(self, device_id: str) -> bytes | None:
        return self._data.get(device_id)

    async def get_many(self, device_ids: list[str]) -> dict[str, bytes]:
        return {d: self._data[d] for d in device_ids if d in self._data}

    async def put_many(self, states: dict[str, bytes]) -> None:
        self._data.update(states)

    async def delete(self, device_id: str) -> None:
        self._data.pop(device_id, None)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._data.clear()


class RedisCache:
    def __init__(self, url: str) -> None:
        self._redis = redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)

    async def get(self, device_id: str) -> bytes | None:
        return await self._redis.get(KEY_PREFIX + device_id)

    async def get_many(self, device_ids: list[str]) -> dict[str, bytes]:
        if not device_ids:
            return {}
        values = await self._redis.mget([KEY_PREFIX + d for d in device_ids])
        return {d: v for d, v in zip(device_ids, values, strict=True) if v is not None}

    async def put_many(self, states: dict[str, bytes]) -> None:
        if states:
            await self._redis.mset({KEY_PREFIX + d: v for d, v in states.items()})

    async def delete(self, device_id: str) -> None:
        await self._redis.delete(KEY_PREFIX + device_id)

    async def ping(self) -> bool:
        return bool(await self._redis.ping())

    async def close(self) -> None:
        await self._redis.aclose()


def make_cache(redis_url: str | None) -> StateCache:
    return RedisCache(redis_url) if redis_url else MemoryCache()
