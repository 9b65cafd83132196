"""A partition's fence: only its current holder's writes commit.

A holder claims its partition (`actor_partitions`: the lease's KV revision and its name) in a
transaction of its own before it reads any of the partition's state, and every commit of
its state locks the claim's row in the same transaction and finds it still naming its claim
(`committer.Committer`, for the partitions of a group commit at once, a deleted device's
drop among them). A holder paused long enough for its lease to expire and be taken
(GC, a stopped container, SIGSTOP) finds the row claimed by the new holder when it wakes:
its write is not made, nothing is acked, and it lets the partition go.

The row lock orders the two: on Postgres, a claim waits for a commit that locked the row
first (and the new holder then reads what it wrote); SQLite has one writer.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn, cast

from prometheus_client import Counter
from sqlalchemy import CursorResult, Table, Update, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import messages as m
from libs.db.engine import insert_ignoring_duplicates
from libs.db.models import ActorPartitionFence
from libs.lease import Lease

log = logging.getLogger(__name__)

REFUSED = Counter(
    "smarthome_actor_fenced_writes_total",
    "State writes refused because the partition's lease was taken over meanwhile",
    ["partition"],
)

_table = cast(Table, ActorPartitionFence.__table__)


class Fenced(Exception):
    """The partition was claimed by a newer holder: this process must let it go."""


class Fence:
    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], partition: int, lease: Lease
    ) -> None:
        self._sessions = sessions
        self.partition = partition
        self._lease = lease
        self.revision = 0  # the lease's revision when claimed: 0 before

    async def claim(self) -> bool:
        """Claim the partition with the lease's revision (True), in a transaction of its own;
        False when the lease is no longer this process's (it took too long)."""
        revision = self._lease.revision
        row = {"partition": self.partition, "revision": 0, "holder": "", "claimed_at": m.now()}
        async with self._sessions.begin() as session:
            await session.execute(insert_ignoring_duplicates(session.get_bind(), _table), [row])
            moved = await session.execute(
                self._claim().where(ActorPartitionFence.revision < revision)
            )
            if _rows(moved) == 0:
                # A stored revision at or above ours: a newer holder claimed (then the lease is
                # no longer ours), or the lease bucket was made afresh and numbers again from
                # 1 (a new bus with the database kept): ours if the bus says it still is.
                if not await self._lease.still_held():
                    return False
                await session.execute(self._claim())
        self.revision = revision
        log.info("partition %d claimed at lease revision %d", self.partition, revision)
        return True

    def _claim(self) -> Update:
        return (
            update(ActorPartitionFence)
            .where(ActorPartitionFence.partition == self.partition)
            .values(revision=self._lease.revision, holder=self._lease.owner, claimed_at=m.now())
        )

    @property
    def claimed(self) -> tuple[int, str]:
        """What the partition's row holds while this holder's claim stands."""
        return self.revision, self._lease.owner

    async def still_mine(self) -> None:
        """Before publishing what a batch decided: raise `Fenced` if claimed by another.
        The lease renewed recently is proof enough (no read); after a pause, the row says."""
        if self._lease.surely_held():
            return
        async with self._sessions() as session:
            found = await session.execute(
                select(ActorPartitionFence.revision, ActorPartitionFence.holder).where(
                    ActorPartitionFence.partition == self.partition
                )
            )
            row = found.first()
        if row is None or (row[0], row[1]) != (self.revision, self._lease.owner):
            self.refused()

    def refused(self) -> NoReturn:
        REFUSED.labels(str(self.partition)).inc()
        log.warning(
            "partition %d: its lease was taken over; late write refused, letting it go",
            self.partition,
        )
        raise Fenced(f"partition {self.partition} claimed by a newer holder")


def _rows(result: object) -> int:
    """The rows an UPDATE matched (its result is a CursorResult)."""
    return int(cast(CursorResult[Any], result).rowcount)
