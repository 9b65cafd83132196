"""audit: append-only, hash-chained, with retention checkpoints; target, reason, cause

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 13:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import libs.db.models
from libs import audit_chain

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC = libs.db.models.UTCDateTime(timezone=True)
REFUSED = "audit rows are append-only: only retention deletes, up to a checkpoint"

# Postgres: one trigger function refuses UPDATE, and DELETE of a row no checkpoint covers
# (retention writes the signed checkpoint first, in the same transaction); TRUNCATE too.
# Whoever can write a checkpoint row can pass, but not sign it: verify names it.
PG_FUNCTION = f"""
CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND OLD.id <= (SELECT max(cut_id) FROM audit_checkpoints) THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION '{REFUSED}' USING ERRCODE = 'insufficient_privilege';
END
$$
"""
PG_TRIGGERS = (
    "CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit "
    "FOR EACH ROW EXECUTE FUNCTION audit_append_only()",
    "CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit "
    "FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only()",
)
SQLITE_TRIGGERS = (
    f"CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit "
    f"BEGIN SELECT RAISE(ABORT, '{REFUSED}'); END",
    f"CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit "
    f"WHEN OLD.id > coalesce((SELECT max(cut_id) FROM audit_checkpoints), 0) "
    f"BEGIN SELECT RAISE(ABORT, '{REFUSED}'); END",
)


def upgrade() -> None:
    op.create_table(
        "audit_checkpoints",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True),
        sa.Column("cut_id", sa.BigInteger(), nullable=False),
        sa.Column("cut_hash", sa.String(length=64), nullable=False),
        sa.Column("time", UTC, nullable=False),
        sa.Column("signature", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_checkpoints")),
        sa.UniqueConstraint("cut_id", name=op.f("uq_audit_checkpoints_cut_id")),
    )
    with op.batch_alter_table("audit") as batch:
        batch.add_column(sa.Column("target", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("reason", sa.Text(), nullable=True))
        batch.add_column(sa.Column("cause_id", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("recorded_at", UTC, nullable=True))
        batch.add_column(sa.Column("hash", sa.String(length=64), nullable=True))
    _chain_existing_rows()
    with op.batch_alter_table("audit") as batch:
        batch.alter_column("recorded_at", existing_type=UTC, nullable=False)
        batch.alter_column("hash", existing_type=sa.String(length=64), nullable=False)
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_FUNCTION)
        for statement in PG_TRIGGERS:
            op.execute(statement)
    else:
        for statement in SQLITE_TRIGGERS:
            op.execute(statement)


def _chain_existing_rows() -> None:
    """Rows written before this revision join the chain in id order, recorded at their time."""
    audit = sa.table(
        "audit",
        *(sa.column(name) for name in ("id", "actor", "action", "device_id", "result")),
        *(sa.column(name) for name in ("correlation_id", "stream", "source_seq", "home")),
        *(sa.column(name) for name in ("target", "reason", "cause_id", "hash")),
        sa.column("time", UTC),
        sa.column("recorded_at", UTC),
        sa.column("detail", sa.JSON()),
    )
    bind = op.get_bind()
    previous, after = audit_chain.GENESIS, 0
    while True:
        rows = bind.execute(
            sa.select(audit).where(audit.c.id > after).order_by(audit.c.id).limit(1000)
        ).mappings()
        chunk = [dict(row) for row in rows]
        if not chunk:
            return
        for row in chunk:
            row["recorded_at"] = row["time"]
            previous = audit_chain.link(previous, row)
            bind.execute(
                sa.update(audit)
                .where(audit.c.id == row["id"])
                .values(recorded_at=row["recorded_at"], hash=previous)
            )
        after = chunk[-1]["id"]


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER audit_no_truncate ON audit")
        op.execute("DROP TRIGGER audit_append_only ON audit")
        op.execute("DROP FUNCTION audit_append_only()")
    else:
        op.execute("DROP TRIGGER audit_no_delete")
        op.execute("DROP TRIGGER audit_no_update")
    with op.batch_alter_table("audit") as batch:
        batch.drop_column("hash")
        batch.drop_column("recorded_at")
        batch.drop_column("cause_id")
        batch.drop_column("reason")
        batch.drop_column("target")
    op.drop_table("audit_checkpoints")
