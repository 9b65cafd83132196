"""The actors' cache writes: states committed while a call is under way go together in the
next one, and a cache outage loses nothing once it answers again. A fake cache (the logic
alone; `test_cache_faults.py` runs the real one through its outages)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from libs.cache import MemoryCache
from libs.messages import DeviceSnapshot
from services.actors import cache_writer
from services.actors.cache_writer import CacheWriter
from tests.helpers import eventually


class GatedCache(MemoryCache):
    """A cache whose calls are recorded, wait for `gate`, and fail while `down`."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.down = False

    async def put_newer(self, snapshots: Sequence[DeviceSnapshot]) -> int:
        self.calls.append(sorted(s.device_id for s in snapshots))
        await self.gate.wait()
        if self.down:
            raise ConnectionError("the cache is down")
        return await super().put_newer(snapshots)


def state(device_id: str, seq: int) -> DeviceSnapshot:
    return DeviceSnapshot(device_id=device_id, version=seq, last_seq=seq)


async def test_states_committed_during_a_call_go_together_in_the_next() -> None:
    cache = GatedCache()
    writer = CacheWriter(cache)
    cache.gate.clear()
    first = asyncio.create_task(writer.write("p0", [state("a", 1)]))
    await eventually(lambda: cache.calls == [["a"]], timeout=5, interval=0.001)  # held
    later = [
        asyncio.create_task(writer.write("p1", [state("b", 1)])),
        asyncio.create_task(writer.write("p0", [state("a", 2), state("c", 1)])),
    ]
    await asyncio.sleep(0)  # one turn of the loop: each writer runs up to its wait
    assert not first.done() and cache.calls == [["a"]]

    cache.gate.set()
    await asyncio.wait_for(asyncio.gather(first, *later), 5)

    assert cache.calls == [["a"], ["a", "b", "c"]]
    assert await cache.get("a") is not None and cache._order["a"] == (2, 2)


async def test_a_batch_that_changed_no_state_is_not_held_up() -> None:
    cache = GatedCache()
    writer = CacheWriter(cache)
    await asyncio.wait_for(writer.write("p0", []), 5)
    assert cache.calls == []


async def test_a_cancelled_writer_leaves_the_shared_call_to_the_others() -> None:
    cache = GatedCache()
    writer = CacheWriter(cache)
    cache.gate.clear()
    going = asyncio.create_task(writer.write("p0", [state("a", 1)]))
    staying = asyncio.create_task(writer.write("p1", [state("b", 1)]))
    await eventually(lambda: cache.calls == [["a", "b"]], timeout=5, interval=0.001)
    going.cancel()
    cache.gate.set()
    await asyncio.wait_for(staying, 5)
    assert set(await cache.get_many(["a", "b"])) == {"a", "b"}


async def test_what_an_outage_missed_is_written_later_unless_deleted_or_let_go(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cache_writer, "CACHE_RETRY_S", 0.0)  # ask again at the next call
    cache = GatedCache()
    writer = CacheWriter(cache)
    cache.down = True
    await writer.write("p0", [state("kept", 1), state("deleted", 1)])
    await writer.write("p1", [state("moved", 1)])
    assert await cache.get_many(["kept", "deleted", "moved"]) == {}

    writer.discard("deleted")
    writer.abandon("p1")
    cache.down = False
    await writer.write("p0", [state("new", 1)])

    assert cache.calls[-1] == ["kept", "new"]
    assert set(await cache.get_many(["kept", "deleted", "moved", "new"])) == {"kept", "new"}
