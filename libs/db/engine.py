"""Engine and sessions; dialect-aware upsert helpers."""

from __future__ import annotations

import time
from typing import Any, Protocol

import msgspec
from prometheus_client import Histogram
from sqlalchemy import ColumnElement, event, or_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

DB_SECONDS = Histogram(
    "smarthome_db_seconds", "Time the database took to run a statement", ["operation"]
)
OPERATIONS = ("select", "insert", "update", "delete")
_TIMERS = {op: DB_SECONDS.labels(op) for op in (*OPERATIONS, "other")}


def operation(statement: str) -> str:
    """The metric's label for a statement: its verb, or `other` (DDL, PRAGMA, WITH, ...)."""
    verb = statement.lstrip()[:6].lower()
    return verb if verb in OPERATIONS else "other"


def _timed(engine: AsyncEngine) -> AsyncEngine:
    """Time every statement the engine runs into `smarthome_db_seconds` (an executemany once)."""

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def _start(_conn: Any, _cursor: Any, _statement: str, *_: Any) -> None:
        _conn.info["smarthome_started"] = time.perf_counter()

    @event.listens_for(engine.sync_engine, "after_cursor_execute")
    def _stop(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        started = _conn.info.pop("smarthome_started", None)
        if started is not None:
            _TIMERS[operation(statement)].observe(time.perf_counter() - started)

    return engine


def make_engine(url: str) -> AsyncEngine:
    return _timed(_make_engine(url))


_json_encoder = msgspec.json.Encoder()


def _json_text(value: Any) -> str:
    return _json_encoder.encode(value).decode()


# JSON columns through msgspec, not the standard library: the same values, compact, several
# times faster (the actors write three JSON columns per device state, the gateway reads them).
_JSON: dict[str, Any] = {"json_serializer": _json_text, "json_deserializer": msgspec.json.decode}


def _make_engine(url: str) -> AsyncEngine:
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30}, **_JSON)

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL lets the gateway read while the actors and recorder write.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_async_engine(url, pool_size=5, max_overflow=5, pool_pre_ping=True, **_JSON)


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


class HasDialect(Protocol):
    """An engine or a connection, sync or async (`session.get_bind()`): what speaks which SQL."""

    @property
    def dialect(self) -> Dialect: ...


def dialect_insert(engine: HasDialect, table: Any) -> Any:
    """INSERT for the engine's dialect, which has the ON CONFLICT clauses."""
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    return dialect.insert(table)


def insert_ignoring_duplicates(engine: HasDialect, table: Any) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING for the engine's dialect (idempotent batch writes)."""
    return dialect_insert(engine, table).on_conflict_do_nothing()


def upsert(
    engine: HasDialect,
    table: Any,
    key: str | tuple[str, ...],
    columns: tuple[str, ...] | None = None,
    where: Any = None,
) -> Any:
    """INSERT ... ON CONFLICT (key) DO UPDATE `columns` (default: every other column but the
    primary key) from the new row, where the existing row matches `where` (default: always).
    `key` is a column or the columns of a unique constraint."""
    keys = (key,) if isinstance(key, str) else key
    stmt = dialect_insert(engine, table)
    names = columns or tuple(
        c.name for c in table.columns if c.name not in keys and not c.primary_key
    )
    return stmt.on_conflict_do_update(
        index_elements=list(keys), set_={name: stmt.excluded[name] for name in names}, where=where
    )


def at_or_under(column: Any, path: str) -> ColumnElement[bool]:
    """`column` is the location path `path` or one below it (`home/ground` covers
    `home/ground/kitchen`, not `home/groundfloor`); `_` and `%` in ids are not wildcards."""
    escaped = path.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return or_(column == path, column.like(escaped + "/%", escape="\\"))


def refused(exc: Exception) -> bool:
    """Whether the database refused the data itself (too long, a NUL byte, a constraint): a
    retry would get the same answer, unlike an outage (unreachable, restarting). SQLite says
    it by class; Postgres through asyncpg by SQLSTATE (class 22 data exception, 23 integrity
    constraint). The recorder dead-letters such a message; the gateway answers 422."""
    if isinstance(exc, DataError | IntegrityError):
        return True
    sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None)
    return isinstance(sqlstate, str) and sqlstate[:2] in ("22", "23")
