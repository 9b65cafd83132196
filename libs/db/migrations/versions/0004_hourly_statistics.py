"""recorder: hourly statistics, the hours pending a roll-up, history by time

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 10:00:00.000000
"""

from collections.abc import Sequence
from datetime import timedelta

import sqlalchemy as sa
from alembic import op

import libs.db.models

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "statistics",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("hour", libs.db.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("attribute", sa.String(length=128), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("mean", sa.Float(), nullable=False),
        sa.Column("min", sa.Float(), nullable=False),
        sa.Column("max", sa.Float(), nullable=False),
        sa.Column("last", sa.Float(), nullable=False),
        sa.Column("last_time", libs.db.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_statistics")),
        sa.UniqueConstraint(
            "device_id", "hour", "attribute", name="uq_statistics_device_hour_attr"
        ),
    )
    with op.batch_alter_table("statistics", schema=None) as batch_op:
        batch_op.create_index("ix_statistics_hour", ["hour"], unique=False)

    pending = op.create_table(
        "rollup_pending",
        sa.Column("hour", libs.db.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("changes", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("hour", name=op.f("pk_rollup_pending")),
    )
    with op.batch_alter_table("history", schema=None) as batch_op:
        batch_op.create_index("ix_history_time", ["time"], unique=False)
    _mark_existing_history(pending)


def _mark_existing_history(pending: sa.Table) -> None:
    """History written before this revision is rolled up too (and kept until it is)."""
    history = sa.table("history", sa.column("time", libs.db.models.UTCDateTime(timezone=True)))
    span = sa.select(sa.func.min(history.c.time), sa.func.max(history.c.time))
    oldest, newest = op.get_bind().execute(span).one()
    if oldest is None:
        return
    hour = oldest.replace(minute=0, second=0, microsecond=0)
    rows = []
    while hour <= newest:
        rows.append({"hour": hour, "changes": 1})
        hour += timedelta(hours=1)
    op.bulk_insert(pending, rows)


def downgrade() -> None:
    with op.batch_alter_table("history", schema=None) as batch_op:
        batch_op.drop_index("ix_history_time")
    op.drop_table("rollup_pending")
    with op.batch_alter_table("statistics", schema=None) as batch_op:
        batch_op.drop_index("ix_statistics_hour")
    op.drop_table("statistics")
