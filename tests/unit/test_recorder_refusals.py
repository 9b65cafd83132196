"""Which database errors the recorder takes as a refusal of the data (dead-letter the message)
and which as an outage (retry): pure logic on the errors' classes and SQLSTATEs."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, OperationalError

from libs.db.engine import refused


class PgError(Exception):
    """What asyncpg's errors carry, through SQLAlchemy's adaptation: a SQLSTATE."""

    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("error", "final"),
    [
        (DataError("insert", {}, Exception("value too long")), True),
        (IntegrityError("insert", {}, Exception("NOT NULL constraint failed")), True),
        (DBAPIError("insert", {}, PgError("22021")), True),  # a NUL byte in text
        (DBAPIError("insert", {}, PgError("23505")), True),  # a unique violation
        (DBAPIError("insert", {}, PgError("08006")), False),  # the connection went away
        (DBAPIError("insert", {}, PgError("57P01")), False),  # the server is shutting down
        (OperationalError("insert", {}, Exception("database is locked")), False),
        (ConnectionRefusedError(), False),
    ],
)
def test_only_what_the_data_itself_causes_is_final(error: Exception, final: bool) -> None:
    assert refused(error) is final
