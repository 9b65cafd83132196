"""actor partition fences: who works each partition of the device events

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 16:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import libs.db.models

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # One row per partition, made by its first holder: no rows to fill in on upgrade.
    op.create_table(
        "actor_partitions",
        sa.Column("partition", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("holder", sa.String(length=256), nullable=False),
        sa.Column("claimed_at", libs.db.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("partition", name=op.f("pk_actor_partitions")),
    )


def downgrade() -> None:
    op.drop_table("actor_partitions")
