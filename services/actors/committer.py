"""Group commit: the state writes of every partition an actors process works, ready at the
same time, committed in one transaction.

A partition's worker decides a batch, stores its facts, then hands its write here (`submit`)
and goes on with its next batch; the batch is acked when the write's future ends (the
runtime's `Later`). With 16 partitions and a few events per batch, a transaction each would
cost more than the writes in it; instead one task commits what is queued, group after group:
a lone write at once, and the writes handed in meanwhile together in the next group, which
begins `GROUP_EVERY_S` after the one before at the earliest.

In that one transaction:

- one fence statement for every fenced write: it locks each partition's claim row till the
  commit (a claim waits for it, and the new holder then reads what was written; on
  Postgres in the order of the partitions, which no two groups can then deadlock on) and
  returns the rows; a write whose row no longer names its holder is refused (`Fenced`, to its
  worker alone) and not written;
- the kept writes' deleted devices (a device deleted, `drops`), then one upsert of their
  snapshots, the latest of each device (two partitions never share a device; one partition's
  writes are queued in the order they were decided, each newer than the one before);
- their command statuses, in order.

A worker's later batches are decided on the state its queued writes hold, so a write is never
simply dropped: a transaction that fails because the database is away is tried again, its
writes first, until it commits. One that fails on what it holds is split, each write
committed alone; a write that still fails fails with the writes queued behind it of the same
owner (its worker stops and its successor decides again from what is committed). A write is
withdrawn by cancelling its future (its worker stopped), unless its transaction has begun.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Iterable
from typing import Any, cast

from prometheus_client import Counter
from sqlalchemy import (
    BindParameter,
    Executable,
    Table,
    Update,
    bindparam,
    delete,
    literal_column,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from libs import commands
from libs import messages as m
from libs.db.engine import insert_ignoring_duplicates, upsert
from libs.db.models import ActorPartitionFence, CommandRecord, DeviceState
from libs.loops import OnOneLoop
from libs.messages import DeviceSnapshot
from services.actors.fence import Fence, Fenced

log = logging.getLogger(__name__)

_fences = cast(Table, ActorPartitionFence.__table__)
_commands = cast(Table, CommandRecord.__table__)
_states = cast(Table, DeviceState.__table__)

GROUPS = Counter(
    "smarthome_actor_state_transactions_total",
    "Group commits of the actors' state, committed or tried (events per transaction: "
    "smarthome_actor_events_total over this)",
)

RETRY_FIRST_S = 0.25
RETRY_MAX_S = 5.0
# A group begins at most this often. At a steady trickle each partition's batch is about one
# event, and a transaction per moment's writes (with its cache write and its partitions' acks)
# costs more than the writes in it. What this delays is the ack and the cached state, never
# the facts: they are stored before the write is handed over.
GROUP_EVERY_S = 0.02

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
        # Datetimes: the JSON serializer (msgspec) writes them as ISO 8601, 20x faster than
        # `isoformat` each; read back by `datetime.fromisoformat`.
        "reported": s.reported,
        "stale": s.stale,
    }


def _newer_than_stored() -> Any:
    """A stored state is replaced by newer ones only (see `libs.cache.order`): a worker that
    lost its lease and commits late cannot move the truth backwards."""
    return DeviceState.__table__.c.last_seq < literal_column("excluded.last_seq")


def transient(exc: BaseException) -> bool:
    """Whether a failed transaction may commit if tried again as it is: the database (or the
    way to it) was away, not the writes wrong."""
    if isinstance(exc, DBAPIError):
        return exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError)
    return isinstance(exc, OSError | TimeoutError)


@dataclasses.dataclass(eq=False)
class Write:
    """One batch's state (and deleted devices): committed only while `fence` (None:
    unfenced) is its holder's. `owner`: whose writes are queued in the order decided."""

    owner: object
    fence: Fence | None
    snapshots: list[DeviceSnapshot]
    statuses: list[tuple[str, m.CommandStatusData]]
    drops: list[str]
    done: asyncio.Future[None]

    def settle(self, error: BaseException | None = None) -> None:
        if self.done.done():  # withdrawn
            return
        if error is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(error)


def latest(writes: Iterable[Write]) -> tuple[list[str], list[DeviceSnapshot]]:
    """What a group writes: every device deleted in it, and each device's last snapshot
    (queued after its deletion, if it was deleted and came back)."""
    dropped: set[str] = set()
    final: dict[str, DeviceSnapshot | None] = {}
    for write in writes:
        for device_id in write.drops:
            dropped.add(device_id)
            final[device_id] = None
        for snapshot in write.snapshots:
            final[snapshot.device_id] = snapshot
    return sorted(dropped), [s for s in final.values() if s is not None]


class Committer(OnOneLoop):
    """The one committer of an actors process (`ActorPartitions`): see the module."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions
        self._queue: list[Write] = []
        self._task: asyncio.Task[None] | None = None
        self._next_group_at = 0.0  # loop time
        self._upsert_statement: Any = None  # built on first use: it needs the dialect
        self.groups = 0  # transactions committed or tried (a test reads it)

    def submit(
        self,
        owner: object,
        fence: Fence | None,
        snapshots: list[DeviceSnapshot],
        statuses: list[tuple[str, m.CommandStatusData]],
        drops: list[str] | None = None,
    ) -> asyncio.Future[None]:
        """Queue this write; its future ends once it is committed (`Fenced` if its fence
        refused it, or the error it cannot be stored for). Cancel it to withdraw the write."""
        loop = self._loop
        write = Write(owner, fence, snapshots, statuses, drops or [], loop.create_future())
        self._queue.append(write)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())
        return write.done

    async def close(self) -> None:
        """Stop committing: what is still queued stays unwritten (its batches un-acked)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for write in self._queue:
            write.done.cancel()
        self._queue = []

    def _take(self) -> list[Write]:
        group = [w for w in self._queue if not w.done.done()]  # not withdrawn
        self._queue = []
        return group

    async def _run(self) -> None:
        """Commit what is queued, group after group, until nothing is."""
        loop = self._loop
        attempt = 0
        while True:
            if (wait := self._next_group_at - loop.time()) > 0:
                await asyncio.sleep(wait)  # (what is queued meanwhile joins the group)
            if not (group := self._take()):
                return
            self._next_group_at = loop.time() + GROUP_EVERY_S
            try:
                await self._commit(group)
                attempt = 0
                continue
            except asyncio.CancelledError:  # closed: no writer is left waiting
                for write in group:
                    write.done.cancel()
                raise
            except Exception as exc:  # sorted below: again, or split
                error = exc
            if not transient(error):
                await self._split(group, error)
                continue
            self._queue[:0] = [w for w in group if not w.done.done()]
            delay = min(RETRY_FIRST_S * 2.0 ** min(attempt, 10), RETRY_MAX_S)
            attempt += 1
            log.warning("state write failed, retrying in %.2f s: %r", delay, error)
            await asyncio.sleep(delay)

    async def _split(self, group: list[Write], error: Exception) -> None:
        """A group that failed on what it holds: each write alone, so that only the one
        that cannot be stored fails (with its owner's writes queued behind it)."""
        if len(group) == 1:
            self._fail(group[0], error)
            return
        refused: dict[int, Exception] = {}  # by owner
        for i, write in enumerate(group):
            if write.done.done():
                continue
            if id(write.owner) in refused:  # decided on top of a refused one
                write.settle(refused[id(write.owner)])
                continue
            try:
                await self._commit([write])
            except Exception as exc:  # as in `_run`
                if transient(exc):
                    self._queue[:0] = [w for w in group[i:] if not w.done.done()]
                    return
                refused[id(write.owner)] = exc
                self._fail(write, exc)

    def _fail(self, write: Write, error: Exception) -> None:
        log.error("state write refused by the database: %r", error)
        write.settle(error)
        for queued in self._queue:
            if queued.owner is write.owner:  # decided on top of it
                queued.settle(error)

    async def _commit(self, group: list[Write]) -> None:
        self.groups += 1
        GROUPS.inc()
        # The transaction in one greenlet (`run_sync`): each awaited call of an async session
        # runs in a greenlet of its own (made, switched to, its frame stack mapped and
        # unmapped), five a group when awaited call by call: at the soak's 1,000 events/s
        # the actors mapped 225 stacks a second that way, 93 this way (`perf trace -s`).
        async with self._sessions() as session:
            kept = await session.run_sync(self._write, group)
        for write in kept:
            write.settle()

    def _write(self, session: Session, group: list[Write]) -> list[Write]:
        """The group's transaction; the writes it kept (the fenced ones are settled)."""
        with session.begin():
            kept = _fenced(session, group)
            dropped, snapshots = latest(kept)
            if dropped:
                session.execute(delete(_states).where(_states.c.device_id.in_(dropped)))
            self._upsert(session, snapshots)
            for write in kept:
                for device_id, status in write.statuses:
                    _status(session, device_id, status)
        return kept

    def _upsert(self, session: Session, snapshots: list[DeviceSnapshot]) -> None:
        if not snapshots:
            return
        if self._upsert_statement is None:
            # Built once: constructing it costs more than executing it for a few rows.
            self._upsert_statement = upsert(
                session.get_bind(), DeviceState.__table__, "device_id", where=_newer_than_stored()
            )
        session.execute(self._upsert_statement, [to_row(s) for s in snapshots])


def _fenced(session: Session, group: list[Write]) -> list[Write]:
    """The writes to commit: the unfenced ones, and those whose partition's claim still
    names their holder (its row locked till commit); the others are settled `Fenced`."""
    fences = {w.fence.partition: w.fence for w in group if w.fence is not None}
    if not fences:
        return group
    lock = _LOCK_CLAIMS[session.get_bind().dialect.name]
    found = session.execute(lock, {"partitions": sorted(fences)})
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


def _status(session: Session, device_id: str, status: m.CommandStatusData) -> None:
    """Move the command's status forward; a status that comes before the command's record
    (a rule publishes a command first) is kept in a stand-in row the record fills in."""
    moved = session.execute(
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
        session.execute(stand_in, [commands.stand_in(device_id, status)])
