"""the transactional outbox; whether a webhook subscription may reach private targets

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-13 12:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import libs.db.models

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC = libs.db.models.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "outbox",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("subject", sa.String(length=512), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("headers", sa.JSON(), nullable=True),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("sent_at", UTC, nullable=True),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_outbox")),
        sa.UniqueConstraint("id", name=op.f("uq_outbox_id")),
    )
    op.create_index(op.f("ix_outbox_sent_at"), "outbox", ["sent_at"])
    op.add_column(
        "subscriptions",
        sa.Column("private_targets", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    # Rows stored before did not record their creator's role: one made by a user or a key
    # that is an administrator now keeps its reach; any other (a creator since demoted or
    # gone, or no principal at all) loses it rather than keep a reach nobody vouches for.
    op.execute(
        sa.text(
            "UPDATE subscriptions SET private_targets = true WHERE created_by IN ("
            "SELECT 'user:' || username FROM users WHERE role = 'admin' "
            "UNION SELECT 'apikey:' || id FROM api_keys WHERE role = 'admin')"
        )
    )


def downgrade() -> None:
    with op.batch_alter_table("subscriptions") as batch:
        batch.drop_column("private_targets")
    op.drop_index(op.f("ix_outbox_sent_at"), table_name="outbox")
    op.drop_table("outbox")
