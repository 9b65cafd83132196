"""presence: when each attribute was last reported, which are stale, intervals per device

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 13:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing rows start with nothing reported: an attribute is judged from its next report.
    op.add_column(
        "device_states", sa.Column("reported", sa.JSON(), nullable=False, server_default="{}")
    )
    op.add_column(
        "device_states", sa.Column("stale", sa.JSON(), nullable=False, server_default="[]")
    )
    op.add_column(
        "devices", sa.Column("report_intervals", sa.JSON(), nullable=False, server_default="{}")
    )


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("report_intervals")
    with op.batch_alter_table("device_states") as batch:
        batch.drop_column("stale")
        batch.drop_column("reported")
