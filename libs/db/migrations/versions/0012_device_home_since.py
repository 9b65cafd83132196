"""device home_since: when a device came to the home it is in

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import libs.db.models

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Left null on the devices there are: when they came to their homes is not known, and
    # null keeps their records in sight as they were ("always").
    with op.batch_alter_table("devices") as batch:
        batch.add_column(
            sa.Column("home_since", libs.db.models.UTCDateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("home_since")
