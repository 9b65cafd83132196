"""The actors' group commit on the real database (SQLite, or Postgres with DATABASE_URL):
what one transaction does with a group of partitions' writes."""

from __future__ import annotations

import asyncio
import random

import pytest
from sqlalchemy import update

from libs import messages as m
from libs.db.models import ActorPartitionFence, CommandRecord
from libs.lease import ACTOR_BUCKET, ACTOR_TTL_S, Lease
from services.actors.committer import Committer
from services.actors.fence import Fence, Fenced
from tests.helpers import unique_id
from tests.integration.test_actors import states


async def claimed_fence(js, sessions) -> Fence:  # type: ignore[no-untyped-def]
    """A fence claimed with a real lease, on a partition no actors process works."""
    lease = Lease(js, unique_id("committer-lease"), ACTOR_TTL_S, ACTOR_BUCKET)
    assert await lease.try_acquire()
    fence = Fence(sessions, random.randrange(10_000, 2**30), lease)
    assert await fence.claim()
    return fence


async def taken_over(sessions, fence: Fence) -> None:  # type: ignore[no-untyped-def]
    """What a newer holder's claim does to the partition's row."""
    async with sessions.begin() as session:
        await session.execute(
            update(ActorPartitionFence)
            .where(ActorPartitionFence.partition == fence.partition)
            .values(revision=fence.revision + 1, holder="elsewhere:1")
        )


async def in_one_group(committer: Committer, *writes) -> list:  # type: ignore[no-untyped-def]
    """Commit these writes (owner, fence, snapshots, statuses[, drops]) together: handed
    over at once, before the committer's task runs."""
    done = [committer.submit(*w) for w in writes]
    return await asyncio.gather(*done, return_exceptions=True)


def snapshot(device: str, n: int) -> m.DeviceSnapshot:
    return m.DeviceSnapshot(device_id=device, attributes={"n": n}, version=n, last_seq=n)


async def status_of(sessions, command_id: str) -> str | None:  # type: ignore[no-untyped-def]
    async with sessions() as session:
        row = await session.get(CommandRecord, command_id)
        return None if row is None else row.status


async def test_a_group_commits_every_write_but_the_one_its_fence_refuses(js, sessions) -> None:  # type: ignore[no-untyped-def]
    kept, refused = await claimed_fence(js, sessions), await claimed_fence(js, sessions)
    await taken_over(sessions, refused)
    devices = [unique_id("grouped") for _ in range(3)]
    commands = [unique_id("cmd") for _ in range(3)]
    committer = Committer(sessions)

    def write(fence: Fence | None, i: int):  # type: ignore[no-untyped-def]
        status = m.CommandStatusData(command_id=commands[i], status="done")
        return object(), fence, [snapshot(devices[i], i + 1)], [(devices[i], status)]

    outcomes = await in_one_group(committer, write(kept, 0), write(refused, 1), write(None, 2))

    assert committer.groups == 1
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], Fenced)
    stored = await states(sessions, devices)
    assert {d: s.version for d, s in stored.items()} == {devices[0]: 1, devices[2]: 3}
    assert [await status_of(sessions, c) for c in commands] == ["done", None, "done"]
    # The refused holder's next write is refused alone too; the kept one goes on.
    with pytest.raises(Fenced):
        await committer.submit(object(), refused, [snapshot(devices[1], 5)], [])
    await committer.submit(object(), kept, [snapshot(devices[0], 2)], [])
    assert (await states(sessions, [devices[0]]))[devices[0]].version == 2


async def test_a_lone_write_commits_at_once_and_an_empty_fenced_one_checks_the_fence(
    js, sessions
) -> None:  # type: ignore[no-untyped-def]
    fence = await claimed_fence(js, sessions)
    device = unique_id("lone")
    committer = Committer(sessions)
    await committer.submit(object(), fence, [snapshot(device, 1)], [])
    assert committer.groups == 1
    await committer.submit(object(), fence, [], [])  # nothing to write: what is acked is still ours
    await taken_over(sessions, fence)
    with pytest.raises(Fenced):
        await committer.submit(object(), fence, [], [])
    assert (await states(sessions, [device]))[device].version == 1


async def test_a_write_the_database_refuses_fails_with_those_decided_on_it_and_alone(
    js, sessions
) -> None:  # type: ignore[no-untyped-def]
    fence = await claimed_fence(js, sessions)
    devices = [unique_id("failed") for _ in range(3)]
    committer = Committer(sessions)
    worker = object()  # a partition's worker: its second write was decided on its first
    unstorable = m.DeviceSnapshot(device_id=devices[1], attributes={"n": object()}, last_seq=1)  # type: ignore[dict-item]

    outcomes = await in_one_group(
        committer,
        (object(), fence, [snapshot(devices[0], 1)], []),
        (worker, None, [unstorable], []),
        (worker, None, [snapshot(devices[2], 1)], []),
    )

    assert outcomes[0] is None  # another worker's write of the same group
    assert isinstance(outcomes[1], Exception) and not isinstance(outcomes[1], Fenced)
    assert outcomes[2] is outcomes[1]
    assert set(await states(sessions, devices)) == {devices[0]}
    # The committer goes on.
    await committer.submit(object(), fence, [snapshot(devices[0], 2)], [])
    assert (await states(sessions, [devices[0]]))[devices[0]].version == 2


async def test_a_deleted_device_is_deleted_in_order_with_its_partitions_writes(
    js, sessions
) -> None:  # type: ignore[no-untyped-def]
    fence = await claimed_fence(js, sessions)
    gone, back = unique_id("dropped"), unique_id("reregistered")
    committer = Committer(sessions)
    worker = object()
    await committer.submit(object(), fence, [snapshot(gone, 1), snapshot(back, 1)], [])

    # In one group: each device's last word wins, a deletion and what came after it.
    outcomes = await in_one_group(
        committer,
        (worker, fence, [snapshot(gone, 2), snapshot(back, 2)], []),
        (worker, fence, [], [], [gone, back]),
        (worker, fence, [snapshot(back, 1)], []),  # registered again: a fresh state
    )

    assert outcomes == [None, None, None]
    assert {d: s.version for d, s in (await states(sessions, [gone, back])).items()} == {back: 1}
    # Alone, with a fence taken over: refused, nothing deleted.
    await taken_over(sessions, fence)
    with pytest.raises(Fenced):
        await committer.submit(worker, fence, [], [], [back])
    assert set(await states(sessions, [back])) == {back}
