"""notification channels: e-mail, Slack-compatible webhooks, ntfy

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 14:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import libs.db.models

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A channel's deliveries that needed a retry are rows of `deliveries` (source `notify`),
    # like a subscription's notifications: no table of their own.
    op.create_table(
        "channels",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("home", sa.String(length=128), nullable=True),
        sa.Column("private_targets", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("created_at", libs.db.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("delivered_count", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("last_delivered_at", libs.db.models.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_channels")),
    )
    op.create_index(op.f("ix_channels_home"), "channels", ["home"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_channels_home"), table_name="channels")
    op.drop_table("channels")
