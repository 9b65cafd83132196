"""webhooks: batched mode, delivered counters, notification deliveries

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 20:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import libs.db.models

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("subscriptions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("batch_size", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("delivered_count", sa.BigInteger(), server_default="0", nullable=False)
        )
        batch_op.add_column(
            sa.Column("last_delivered_at", libs.db.models.UTCDateTime(timezone=True), nullable=True)
        )
    # Rows so far are all from the subscriptions' filters.
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("source", sa.String(length=16), server_default="filter", nullable=False)
        )
        batch_op.add_column(sa.Column("webhook_id", sa.String(length=160), nullable=True))
        batch_op.drop_constraint("uq_deliveries_sub_seq", type_="unique")
        batch_op.create_unique_constraint(
            "uq_deliveries_sub_source_seq", ["subscription_id", "source", "event_seq"]
        )


def downgrade() -> None:
    op.execute("DELETE FROM deliveries WHERE source <> 'filter'")
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_constraint("uq_deliveries_sub_source_seq", type_="unique")
        batch_op.create_unique_constraint("uq_deliveries_sub_seq", ["subscription_id", "event_seq"])
        batch_op.drop_column("webhook_id")
        batch_op.drop_column("source")
    with op.batch_alter_table("subscriptions", schema=None) as batch_op:
        batch_op.drop_column("last_delivered_at")
        batch_op.drop_column("delivered_count")
        batch_op.drop_column("batch_size")
