"""Reading a KV bucket's current keys: right, and without leaving consumers on the bus."""

from __future__ import annotations

import asyncio

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig

from libs import kv as kv_read
from libs.lease import Members
from tests.helpers import eventually, unique_id


async def test_members_counted_again_and_again_leave_no_consumer_behind(
    js: JetStreamContext,
) -> None:
    """The actors count their peers every half second: each count's watcher must go."""
    bucket = unique_id("members")
    stop = asyncio.Event()
    members = [Members(js, "actors", f"process-{i}", ttl=6.0, bucket_name=bucket) for i in (1, 2)]
    beats = [asyncio.create_task(m.beat(stop)) for m in members]
    try:
        assert await eventually(lambda: _counted(members[0], 2))
        for _ in range(10):
            assert await members[0].count() == 2

        async def no_consumer() -> bool:
            return (await js.stream_info(f"KV_{bucket}")).state.consumer_count == 0

        # nats-py's own `keys()` left each for five minutes.
        assert await eventually(no_consumer, timeout=10.0)
    finally:
        stop.set()
        await asyncio.gather(*beats)
        await js.delete_key_value(bucket)


async def test_a_member_that_leaves_is_not_counted(js: JetStreamContext) -> None:
    bucket = unique_id("members")
    stop, leave = asyncio.Event(), asyncio.Event()
    staying = Members(js, "actors", "staying", ttl=6.0, bucket_name=bucket)
    leaving = Members(js, "actors", "leaving", ttl=6.0, bucket_name=bucket)
    other_kind = Members(js, "rules", "elsewhere", ttl=6.0, bucket_name=bucket)
    beats = [
        asyncio.create_task(staying.beat(stop)),
        asyncio.create_task(leaving.beat(leave)),
        asyncio.create_task(other_kind.beat(stop)),
    ]
    try:
        assert await eventually(lambda: _counted(staying, 2))
        leave.set()  # deletes its key at once: counted out before its ttl
        assert await eventually(lambda: _counted(staying, 1), timeout=3.0)
    finally:
        stop.set()
        leave.set()
        await asyncio.gather(*beats)
        await js.delete_key_value(bucket)


async def test_entries_are_the_current_values_without_deleted_keys(js: JetStreamContext) -> None:
    bucket = unique_id("kv")
    kv = await js.create_key_value(KeyValueConfig(bucket=bucket, history=5))
    try:
        assert await kv_read.entries(kv) == []
        await kv.put("a.one", b"1")
        await kv.put("a.one", b"2")
        await kv.put("a.two", b"x")
        await kv.put("b.one", b"y")
        await kv.delete("a.two")

        found = {e.key: e.value for e in await kv_read.entries(kv)}

        assert found == {"a.one": b"2", "b.one": b"y"}
        assert sorted(await kv_read.keys(kv, "a.>")) == ["a.one"]
    finally:
        await js.delete_key_value(bucket)


async def _counted(members: Members, expected: int) -> bool:
    return await members.count() == expected
