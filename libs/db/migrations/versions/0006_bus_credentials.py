"""bus identities: devices' and bridges' credentials, bridges, provisioning tokens, claims

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 12:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import libs.db.models

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC = libs.db.models.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "bus_credentials",
        sa.Column("identity", sa.String(length=160), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("issued_by", sa.String(length=200), nullable=False),
        sa.Column("issued_at", UTC, nullable=False),
        sa.PrimaryKeyConstraint("identity", name=op.f("pk_bus_credentials")),
    )
    op.create_table(
        "bridges",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("home", sa.String(length=128), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bridges")),
    )
    op.create_index(op.f("ix_bridges_home"), "bridges", ["home"])
    op.create_table(
        "bridge_devices",
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("bridge_id", sa.String(length=128), nullable=False),
        sa.ForeignKeyConstraint(
            ["bridge_id"],
            ["bridges.id"],
            name=op.f("fk_bridge_devices_bridge_id_bridges"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_bridge_devices")),
    )
    op.create_index(op.f("ix_bridge_devices_bridge_id"), "bridge_devices", ["bridge_id"])
    op.create_table(
        "provisioning_tokens",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("home", sa.String(length=128), nullable=False),
        sa.Column("expires_at", UTC, nullable=False),
        sa.Column("max_uses", sa.Integer(), nullable=False),
        sa.Column("uses", sa.Integer(), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_provisioning_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_provisioning_tokens_token_hash")),
    )
    op.create_table(
        "device_claims",
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("token_id", sa.String(length=64), nullable=False),
        sa.Column("home", sa.String(length=128), nullable=False),
        sa.Column("nonce", sa.String(length=64), nullable=False),
        sa.Column("claimed_at", UTC, nullable=False),
        sa.ForeignKeyConstraint(
            ["token_id"],
            ["provisioning_tokens.id"],
            name=op.f("fk_device_claims_token_id_provisioning_tokens"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_device_claims")),
    )
    op.create_index(op.f("ix_device_claims_token_id"), "device_claims", ["token_id"])


def downgrade() -> None:
    op.drop_table("device_claims")
    op.drop_table("provisioning_tokens")
    op.drop_table("bridge_devices")
    op.drop_table("bridges")
    op.drop_table("bus_credentials")
