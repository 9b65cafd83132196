"""Engine and sessions; dialect-aware upsert helpers."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, event, or_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine


def make_engine(url: str) -> AsyncEngine:
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL lets the gateway read while the actors and recorder write.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_async_engine(url, pool_size=5, max_overflow=5, pool_pre_ping=True)


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker:
    return async_sessionmaker(engine, expire_on_commit=False)


def insert_ignoring_duplicates(engine: AsyncEngine, table: Any) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING for the engine's dialect (idempotent batch writes)."""
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    return dialect.insert(table).on_conflict_do_nothing()


def upsert(
    engine: AsyncEngine,
    table: Any,
    key: str,
    columns: tuple[str, ...] | None = None,
    where: Any = None,
) -> Any:
    """INSERT ... ON CONFLICT (key) DO UPDATE `columns` (default: every other column) from
    the new row, where the existing row matches `where` (default: always)."""
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(table)
    names = columns or tuple(c.name for c in table.columns if c.name != key)
    return stmt.on_conflict_do_update(
        index_elements=[key], set_={name: stmt.excluded[name] for name in names}, where=where
    )


def at_or_under(column: Any, path: str) -> ColumnElement[bool]:
    """`column` is the location path `path` or one below it (`home/ground` covers
    `home/ground/kitchen`, not `home/groundfloor`); `_` and `%` in ids are not wildcards."""
    escaped = path.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return or_(column == path, column.like(escaped + "/%", escape="\\"))
