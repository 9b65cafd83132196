"""A batch's history rows, written with the least work a row: on Postgres in one statement
with the marks of their hours, elsewhere (SQLite) in one executemany of plain tuples.

SQLAlchemy's executemany of an ORM insert runs its generic parameter processing for every
row; here the rows go to the driver as they are. On Postgres each column goes as one array
(`unnest`), encoded by asyncpg in C, and the hours are marked pending in the same round trip
(a data-modifying CTE); `data` is JSON text (msgspec's, compact: the same values as
`json.dumps` gives). On SQLite the columns' own bind processors make the values, so the rows
are those the ORM statement stores, byte for byte. Either way the rows are those of
`insert_ignoring_duplicates(HistoryEntry)` and `rollup.mark_pending`: a redelivered message's
row is ignored by the same unique key, an hour marked again counts one change more. Both run
through the session's connection (`exec_driver_sql`): in its transaction, its errors are
SQLAlchemy's as for any statement (`libs.db.engine.refused`).
"""

from __future__ import annotations

from typing import Any

import msgspec
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from libs.db.models import HistoryEntry
from services.recorder import rollup
from services.recorder.hourly import hours_of

# The history table's columns but its id, in the order of the statements' parameters.
HISTORY_COLUMNS = ("device_id", "time", "type", "data", "stream", "source_seq")
_INTO = f"INSERT INTO history ({', '.join(HISTORY_COLUMNS)})"

# Text arrays, not varchar(n): an explicit cast to varchar(n) would cut a long value where
# the insert's own (assignment) cast refuses it, as the ORM statement's insert does.
POSTGRES_STATEMENT = f"""
WITH marked AS (
    INSERT INTO rollup_pending AS pending (hour, changes)
    SELECT hour, 1 FROM unnest($7::timestamptz[]) AS hours(hour)
    ON CONFLICT (hour) DO UPDATE SET changes = pending.changes + 1
)
{_INTO}
SELECT device_id, time, type, data::json, stream, source_seq
FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::text[], $5::text[], $6::bigint[])
    AS batch(device_id, time, type, data, stream, source_seq)
ON CONFLICT DO NOTHING
"""
SQLITE_STATEMENT = f"{_INTO} VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"

_json = msgspec.json.Encoder()


def postgres_arrays(history: list[dict[str, Any]]) -> tuple[list[Any], ...]:
    """The Postgres statement's parameters: a list per column, then the hours to mark."""
    columns: tuple[list[Any], ...] = ([], [], [], [], [], [])
    device_ids, times, types, datas, streams, seqs = columns
    for row in history:
        device_ids.append(row["device_id"])
        times.append(row["time"])
        types.append(row["type"])
        datas.append(_json.encode(row["data"]).decode())
        streams.append(row["stream"])
        seqs.append(row["source_seq"])
    return (*columns, hours_of(history))


class HistoryWriter:
    """Writes a batch's history rows and marks their hours pending, for one engine."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._postgres = engine.dialect.name == "postgresql"
        table = HistoryEntry.__table__
        # What the ORM statement would make of a time and of a JSON value (SQLite's text).
        self._time = table.c.time.type.bind_processor(engine.dialect) or _same
        self._data = table.c.data.type.bind_processor(engine.dialect) or _same
        self._mark_pending = rollup.mark_pending(engine)

    async def write(self, session: AsyncSession, history: list[dict[str, Any]]) -> None:
        """Insert `history` and mark its hours pending, in the session's transaction."""
        connection = await session.connection()
        if self._postgres:
            await connection.exec_driver_sql(POSTGRES_STATEMENT, postgres_arrays(history))
            return
        time, data = self._time, self._data
        rows = [
            (
                r["device_id"],
                time(r["time"]),
                r["type"],
                data(r["data"]),
                r["stream"],
                r["source_seq"],
            )
            for r in history
        ]
        await connection.exec_driver_sql(SQLITE_STATEMENT, rows)
        await session.execute(self._mark_pending, rollup.pending_hours(history))


def _same(value: Any) -> Any:
    return value
