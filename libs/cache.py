"""Hot device state: Redis when REDIS_URL is set, else an in-process dict (write-through).

Only a cache: the database is the truth. A value is an encoded `DeviceSnapshot`, and a write
replaces a value only when it is newer by `order` (compare-and-set, in Redis by a script),
so that writes arriving late, or an old value put back by a restore from a snapshot, a flush
or another process, are never written over a newer one by the platform. Readers still check
a value against the database before they trust it (it may be older after such a restore).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, cast

import redis.asyncio as redis
from prometheus_client import Counter

from libs import messages as m
from libs.messages import DeviceSnapshot

KEY_PREFIX = "smarthome:device-state:"
# A batch of writes is cut into scripts of this many keys: one script blocks Redis meanwhile.
PUT_CHUNK = 500

HITS = Counter("smarthome_cache_hits_total", "Device states read from the cache")
MISSES = Counter(
    "smarthome_cache_misses_total", "Device states asked of the cache that it did not hold"
)


def _counted(asked: int, found: int) -> None:
    HITS.inc(found)
    MISSES.inc(asked - found)


def order(snapshot: DeviceSnapshot) -> tuple[int, int]:
    """Which of two states of a device is newer: the stream sequence of the last event
    applied, then the version. The sequence comes first: it keeps growing when a deleted
    device's id is registered again, where the version starts over."""
    return snapshot.last_seq, snapshot.version


class StateCache(Protocol):
    async def get(self, device_id: str) -> bytes | None: ...
    async def get_many(self, device_ids: list[str]) -> dict[str, bytes]: ...
    async def put_newer(self, snapshots: Sequence[DeviceSnapshot]) -> int:
        """Store each snapshot unless the cache holds a state as new or newer; how many were."""
        ...

    async def delete(self, device_id: str) -> None: ...
    async def ping(self) -> bool: ...
    async def close(self) -> None: ...


class MemoryCache:
    """The embedded default: lives only in the process that holds it."""

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}
        self._order: dict[str, tuple[int, int]] = {}

    async def get(self, device_id: str) -> bytes | None:
        value = self._data.get(device_id)
        _counted(1, value is not None)
        return value

    async def get_many(self, device_ids: list[str]) -> dict[str, bytes]:
        found = {d: self._data[d] for d in device_ids if d in self._data}
        _counted(len(device_ids), len(found))
        return found

    async def put_newer(self, snapshots: Sequence[DeviceSnapshot]) -> int:
        written = 0
        for snapshot in snapshots:
            device_id = snapshot.device_id
            if device_id in self._order and order(snapshot) <= self._order[device_id]:
                continue
            self._data[device_id] = m.encode(snapshot)
            self._order[device_id] = order(snapshot)
            written += 1
        return written

    async def delete(self, device_id: str) -> None:
        self._data.pop(device_id, None)
        self._order.pop(device_id, None)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._data.clear()
        self._order.clear()


# KEYS: the devices' keys; ARGV: for each key its last_seq, version and value. A value that
# is not a readable state (written by something else) is replaced.
PUT_NEWER = """
local written = 0
for i, key in ipairs(KEYS) do
  local seq, version = tonumber(ARGV[3 * i - 2]), tonumber(ARGV[3 * i - 1])
  local newer = true
  local current = redis.call('GET', key)
  if current then
    local ok, old = pcall(cjson.decode, current)
    if ok and type(old) == 'table' then
      local old_seq = tonumber(old['last_seq']) or 0
      local old_version = tonumber(old['version']) or 0
      newer = seq > old_seq or (seq == old_seq and version > old_version)
    end
  end
  if newer then
    redis.call('SET', key, ARGV[3 * i])
    written = written + 1
  end
end
return written
"""


class RedisCache:
    def __init__(self, url: str) -> None:
        self._redis = redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._put_newer = self._redis.register_script(PUT_NEWER)

    async def get(self, device_id: str) -> bytes | None:
        # Made without `decode_responses`: the client answers bytes (its stubs say bytes | str).
        value = cast(bytes | None, await self._redis.get(KEY_PREFIX + device_id))
        _counted(1, value is not None)
        return value

    async def get_many(self, device_ids: list[str]) -> dict[str, bytes]:
        if not device_ids:
            return {}
        values = cast(
            list[bytes | None], await self._redis.mget([KEY_PREFIX + d for d in device_ids])
        )
        found = {d: v for d, v in zip(device_ids, values, strict=True) if v is not None}
        _counted(len(device_ids), len(found))
        return found

    async def put_newer(self, snapshots: Sequence[DeviceSnapshot]) -> int:
        written = 0
        for start in range(0, len(snapshots), PUT_CHUNK):
            chunk = snapshots[start : start + PUT_CHUNK]
            keys = [KEY_PREFIX + s.device_id for s in chunk]
            args: list[int | bytes] = []
            for s in chunk:
                args += [s.last_seq, s.version, m.encode(s)]
            written += int(await self._put_newer(keys=keys, args=args))
        return written

    async def delete(self, device_id: str) -> None:
        await self._redis.delete(KEY_PREFIX + device_id)

    async def ping(self) -> bool:
        return bool(await self._redis.ping())

    async def close(self) -> None:
        await self._redis.aclose()


def make_cache(redis_url: str | None) -> StateCache:
    return RedisCache(redis_url) if redis_url else MemoryCache()
