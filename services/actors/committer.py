"""Group commit: the state writes of every partition an actors process works, ready at the
same time, committed in one transaction.

A partition's worker decides a batch, stores its facts, then hands its write here (`commit`)
and waits for it. With 16 partitions and a few events per batch, a transaction each would
cost more than the writes in it; instead, whichever worker finds the committer free commits
at once what is queued (its own write, alone at a trickle), and the writes handed in
meanwhile are committed together by the next one to take its turn (`asyncio.Lock` is
first come, first served: no wake-up is lost).

In that one transaction:

- one fence statement for every fenced write: it locks each partition's claim row till the
  commit (a claim waits for it, and the new holder then reads what was written; on
  Postgres in the order of the partitions, which no two groups can then deadlock on) and
  returns the rows; a write whose row no longer names its holder is refused (`Fenced`, to its
  worker alone) and not written;
- one upsert of every kept write's snapshots (two partitions never share a device, and a
  partition never has two writes queued: its worker waits for its commit);
- their command statuses.

A failed transaction (the database down) fails every write in it: each worker retries its
batch, acking nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, cast

from sqlalchemy import (
    BindParameter,
    Executable,
    Table,
    Update,
    bindparam,
    literal_column,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import commands
from libs import messages as m
from libs.db.engine import insert_ignoring_duplicates, upsert
from libs.db.models import ActorPartitionFence, CommandRecord, DeviceState, reported_times
from libs.messages import DeviceSnapshot
from services.actors.fence import Fence, Fenced

_fences = cast(Table, ActorPartitionFence.__table__)
_commands = cast(Table, CommandRecord.__table__)

# Which command status may follow which: a late `delivered` never undoes `done`.
NEXT_STATUS = {
    "delivered": ("pending",),
    "done": ("pending", "delivered"),
    "failed": ("pending", "delivered"),
    "expired": ("pending", "delivered"),
}

# Locks the claim rows of the partitions written (till commit) and says who claims each.
# Postgres: in the order of their partitions, so that two processes' groups that share
# partitions for a moment (a paused holder's and its successor's) cannot deadlock. SQLite:
# an UPDATE, whose write lock (one for the database) is taken at once, where a read's is not.
_CLAIMED: BindParameter[int] = bindparam("partitions", expanding=True)
_LOCK_CLAIMS: dict[str, Executable] = {
    "postgresql": select(_fences.c.partition, _fences.c.revision, _fences.c.holder)
    .where(_fences.c.partition.in_(_CLAIMED))
    .order_by(_fences.c.partition)
    .with_for_update(),
    "sqlite": update(_fences)
    .where(_fences.c.partition.in_(_CLAIMED))
    .values(holder=_fences.c.holder)
    .returning(_fences.c.partition, _fences.c.revision, _fences.c.holder),
}

# A command's status moved forward, from the statuses it may follow only.
_MOVE_STATUS: Update = (
    update(_commands)
    .where(
        _commands.c.id == bindparam("command_id"),
        _commands.c.device_id == bindparam("for_device"),
        _commands.c.status.in_(bindparam("after", expanding=True)),
    )
    .values(
        status=bindparam("new_status"), detail=bindparam("new_detail"), updated_at=bindparam("at")
    )
)


def to_row(s: DeviceSnapshot) -> dict:
    return {
        "device_id": s.device_id,
        "state": s.state,
        "mark": s.mark,
        "connection": s.connection,
        "attributes": s.attributes,
        "last_seen": s.last_seen,
        "version": s.version,
        "last_seq": s.last_seq,
        "updated_at": m.now(),
        "reported": reported_times(s.reported),
        "stale": s.stale,
    }


def _newer_than_stored() -> Any:
    """A stored state is replaced by newer ones only (see `libs.cache.order`): a worker that
    lost its lease and commits late cannot move the truth backwards."""
    return DeviceState.__table__.c.last_seq < literal_column("excluded.last_seq")


@dataclasses.dataclass(eq=False)
class Write:
    """One batch's state: committed only while `fence` (None: unfenced) is its holder's."""

    fence: Fence | None
    snapshots: list[DeviceSnapshot]
    statuses: list[tuple[str, m.CommandStatusData]]
    done: bool = False
    error: BaseException | None = None

    def settle(self, error: BaseException | None = None) -> None:
        self.done, self.error = True, error


class Committer:
    """The one committer of an actors process (`ActorPartitions`): see the module."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions
        self._queue: list[Write] = []
        self._turn = asyncio.Lock()
        self._upsert_statement: Any = None  # built on first use: it needs the dialect
        self.groups = 0  # transactions committed or tried (a test reads it)

    async def commit(
        self,
        fence: Fence | None,
        snapshots: list[DeviceSnapshot],
        statuses: list[tuple[str, m.CommandStatusData]],
    ) -> None:
        """Commit this write, with those queued beside it; `Fenced` if its fence refused it,
        or the transaction's error."""
        write = Write(fence, snapshots, statuses)
        self._queue.append(write)
        async with self._turn:
            if not write.done:  # not taken by the turn before: commit what is queued
                group, self._queue = self._queue, []
                await self._commit(group)
        if write.error is not None:
            raise write.error

    async def _commit(self, group: list[Write]) -> None:
        self.groups += 1
        try:
            async with self._sessions.begin() as session:
                kept = await self._fenced(session, group)
                await self._upsert(session, [s for w in kept for s in w.snapshots])
                for write in kept:
                    for device_id, status in write.statuses:
                        await _status(session, device_id, status)
        except BaseException as exc:  # cancelled too: no waiter is left without an answer
            error = exc if isinstance(exc, Exception) else RuntimeError("commit interrupted")
            for write in group:
                if not write.done:
                    write.settle(error)
            raise
        for write in group:
            if not write.done:
                write.settle()

    @staticmethod
    async def _fenced(session: AsyncSession, group: list[Write]) -> list[Write]:
        """The writes to commit: the unfenced ones, and those whose partition's claim still
        names their holder (its row locked till commit); the others are settled `Fenced`."""
        fences = [w.fence for w in group if w.fence is not None]
        if not fences:
            return group
        lock = _LOCK_CLAIMS[session.get_bind().dialect.name]
        found = await session.execute(lock, {"partitions": [f.partition for f in fences]})
        claims = {p: (revision, holder) for p, revision, holder in found}
        kept = []
        for write in group:
            fence = write.fence
            if fence is not None and claims.get(fence.partition) != fence.claimed:
                try:
                    fence.refused()
                except Fenced as exc:
                    write.settle(exc)
                continue
            kept.append(write)
        return kept

    async def _upsert(self, session: AsyncSession, snapshots: list[DeviceSnapshot]) -> None:
        if not snapshots:
            return
        if self._upsert_statement is None:
            # Built once: constructing it costs more than executing it for a few rows.
            self._upsert_statement = upsert(
                session.get_bind(), DeviceState.__table__, "device_id", where=_newer_than_stored()
            )
        await session.execute(self._upsert_statement, [to_row(s) for s in snapshots])


async def _status(session: AsyncSession, device_id: str, status: m.CommandStatusData) -> None:
    """Move the command's status forward; a status that comes before the command's record
    (a rule publishes a command first) is kept in a stand-in row the record fills in."""
    moved = await session.execute(
        _MOVE_STATUS,
        {
            "command_id": status.command_id,
            "for_device": device_id,
            "after": list(NEXT_STATUS[status.status]),
            "new_status": status.status,
            "new_detail": status.detail,
            "at": m.now(),
        },
    )
    if moved.rowcount == 0:  # type: ignore[attr-defined]  # not recorded, or already past it
        stand_in = insert_ignoring_duplicates(session.get_bind(), _commands)
        await session.execute(stand_in, [commands.stand_in(device_id, status)])
