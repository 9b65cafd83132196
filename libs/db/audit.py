"""The audit chain in the database: append rows in one order, cut it for retention behind a
signed checkpoint, and walk it to verify. The chain itself is `libs.audit_chain`.

Appending holds the chain's lock for the rest of the transaction: on Postgres a
transaction-scoped advisory lock, on SQLite the write lock (taken by a write that changes
nothing, before the head is read). The next writer reads the head only after this one
committed, so ids and links follow one order whichever recorder writes; a writer killed
mid-batch rolls back and leaves the head as it was.

Every ORM insert of an `AuditEntry` joins the chain as it is flushed (`_chain_new_entries`),
so a row added any way but raw SQL is chained; the recorder's batches go through `append`.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Table, delete, event, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from libs import audit_chain
from libs import messages as m
from libs.db.models import AuditCheckpoint, AuditEntry
from libs.settings import Settings

ADVISORY_LOCK = 0xA0D17C4A1  # any constant shared by every writer of the chain
VERIFY_CHUNK = 1000
DELETE_CHUNK = 5000
_TABLE: Table = AuditEntry.__table__  # type: ignore[assignment]  # a mapped class's Table
_COLUMNS = tuple(c.name for c in _TABLE.columns)


def checkpoint_key(settings: Settings) -> bytes:
    """The key that signs checkpoints, from the platform's secret: SMARTHOME_JWT_SECRET, or
    the one the gateway keeps in the data dir (made here if this process is first)."""
    if settings.jwt_secret:
        return audit_chain.checkpoint_key(settings.jwt_secret)
    path = settings.data_dir / "jwt-secret"
    if not path.exists():
        _create_private(path, secrets.token_urlsafe(48))
    return audit_chain.checkpoint_key(path.read_text().strip())


def _create_private(path: Path, content: str) -> None:
    """As the gateway makes it (`services.gateway.auth.tokens`): mode 0600, the first wins."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = path.open("x")
    except FileExistsError:
        return
    with fd:
        path.chmod(0o600)
        fd.write(content)


def lock(session: Session) -> None:
    """Hold the chain until the transaction ends."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)").bindparams(key=ADVISORY_LOCK))
    else:
        session.execute(text("UPDATE audit_checkpoints SET id = id WHERE 1 = 0"))


def head(session: Session) -> tuple[int, str]:
    """The id and hash the next row follows: the last row's, else the last checkpoint's."""
    last = session.execute(
        select(AuditEntry.id, AuditEntry.hash).order_by(AuditEntry.id.desc()).limit(1)
    ).first()
    if last is not None:
        return int(last.id), str(last.hash)
    cut = _last_checkpoint(session)
    return (cut.cut_id, cut.cut_hash) if cut is not None else (0, audit_chain.GENESIS)


def _last_checkpoint(session: Session) -> AuditCheckpoint | None:
    return session.scalar(select(AuditCheckpoint).order_by(AuditCheckpoint.cut_id.desc()).limit(1))


def _complete(row: Mapping[str, Any]) -> dict[str, Any]:
    """Every column, with the defaults the table would give."""
    values = {name: row.get(name) for name in _COLUMNS}
    values["detail"] = values["detail"] or {}
    values["recorded_at"] = values["recorded_at"] or m.now()
    return values


def _chained(session: Session, rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """`rows` with the ids and hashes that append them to the chain (the lock held)."""
    last_id, previous = head(session)
    out = []
    for row in rows:
        values = _complete(row)
        last_id += 1
        values["id"] = last_id
        previous = values["hash"] = audit_chain.link(previous, values)
        out.append(values)
    return out


def append(session: Session, rows: list[dict[str, Any]]) -> int:
    """Append the recorder's rows in their order, skipping those already stored (a message
    delivered again: same stream and sequence). How many were new. Run it with
    `AsyncSession.run_sync`, inside the batch's transaction."""
    if not rows:
        return 0
    lock(session)
    seqs = sorted({r["source_seq"] for r in rows})
    found = session.execute(
        select(AuditEntry.stream, AuditEntry.source_seq).where(AuditEntry.source_seq.in_(seqs))
    )
    stored = {(stream, seq) for stream, seq in found}
    fresh = []
    for row in rows:
        key = (row["stream"], row["source_seq"])
        if key not in stored:
            stored.add(key)
            fresh.append(row)
    if fresh:
        session.execute(insert(_TABLE), _chained(session, fresh))
    return len(fresh)


@event.listens_for(Session, "before_flush")
def _chain_new_entries(session: Session, _context: Any, _instances: Any) -> None:
    new = [o for o in session.new if isinstance(o, AuditEntry)]
    if not new:
        return
    lock(session)
    rows = _chained(session, ({c: getattr(o, c) for c in _COLUMNS} for o in new))
    for entry, values in zip(new, rows, strict=True):
        for name, value in values.items():
            setattr(entry, name, value)


# --- retention ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cut:
    """What one retention round did to the chain."""

    checkpoint: int | None  # the row the chain is cut after now (None: nothing to cut)
    deleted: int


async def cut_before(
    sessions: async_sessionmaker[AsyncSession], key: bytes, cutoff: datetime
) -> Cut:
    """Delete the oldest rows, recorded before `cutoff`, behind a signed checkpoint.

    Only a prefix of the chain goes (rows up to the first one recorded since `cutoff`), so
    the rows kept still chain from the checkpoint. The checkpoint is written first, in its
    own transaction; the database lets rows up to it be deleted, a chunk per transaction
    (one long delete would hold SQLite's write lock). A round cut short is finished by the
    next (the checkpoint stays)."""
    async with sessions.begin() as session:
        cut_id = await session.run_sync(_write_checkpoint, key, cutoff)
    if cut_id is None:
        return Cut(None, 0)
    deleted = 0
    while True:
        chunk = select(AuditEntry.id).where(AuditEntry.id <= cut_id).limit(DELETE_CHUNK)
        async with sessions.begin() as session:
            result = await session.execute(delete(AuditEntry).where(AuditEntry.id.in_(chunk)))
        count = int(getattr(result, "rowcount", 0) or 0)  # a CursorResult's
        deleted += count
        if count < DELETE_CHUNK:
            return Cut(cut_id, deleted)


def _write_checkpoint(session: Session, key: bytes, cutoff: datetime) -> int | None:
    """The id the chain is cut after (a new checkpoint when it moved), or None."""
    lock(session)
    kept = session.scalar(select(func.min(AuditEntry.id)).where(AuditEntry.recorded_at >= cutoff))
    last = select(AuditEntry.id, AuditEntry.hash).order_by(AuditEntry.id.desc()).limit(1)
    if kept is not None:
        last = last.where(AuditEntry.id < kept)
    row = session.execute(last).first()
    previous = _last_checkpoint(session)
    if row is None:  # nothing before the first row kept; perhaps a chunked delete to finish
        return previous.cut_id if previous is not None else None
    cut_id, cut_hash = int(row.id), str(row.hash)
    if previous is None or cut_id > previous.cut_id:
        now = m.now()
        session.add(
            AuditCheckpoint(
                cut_id=cut_id,
                cut_hash=cut_hash,
                time=now,
                signature=audit_chain.sign_checkpoint(key, cut_id, cut_hash, now),
            )
        )
    return cut_id


# --- verify ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    ok: bool
    checked: int
    first_bad: audit_chain.Bad | None


async def verify(sessions: async_sessionmaker[AsyncSession], key: bytes) -> Verdict:
    """Walk the chain from the last checkpoint (checked against its signature) or from the
    start, a chunk of rows at a time, to the first row that does not hold."""
    async with sessions() as session:
        cut = await session.scalar(
            select(AuditCheckpoint).order_by(AuditCheckpoint.cut_id.desc()).limit(1)
        )
    walk = audit_chain.Walk()
    if cut is not None:
        walk = audit_chain.Walk(cut.cut_hash, cut.cut_id)
        if not audit_chain.checkpoint_signed(
            key, cut.cut_id, cut.cut_hash, cut.time, cut.signature
        ):
            bad = audit_chain.Bad(cut.cut_id, "the retention checkpoint's signature is not ours")
            walk.fail(bad)
            return Verdict(False, 0, walk.first_bad)
    async for row in _rows_after(sessions, cut.cut_id if cut is not None else 0):
        if not walk.feed(row):
            break
    return Verdict(walk.first_bad is None, walk.checked, walk.first_bad)


async def _rows_after(
    sessions: async_sessionmaker[AsyncSession], after: int
) -> AsyncIterator[dict[str, Any]]:
    table = _TABLE
    while True:
        async with sessions() as session:
            rows = (
                await session.execute(
                    select(table).where(table.c.id > after).order_by(table.c.id).limit(VERIFY_CHUNK)
                )
            ).mappings()
            chunk = [dict(r) for r in rows]
        for row in chunk:
            yield row
        if len(chunk) < VERIFY_CHUNK:
            return
        after = chunk[-1]["id"]
