"""Checkpoints: a job's saved state every `checkpoint_every` steps and at each epoch end, to resume from after a
crash or a stopped worker, and to serve or download like an adapter. `jobs.lost_workers`: the runs of a job
whose worker stopped answering (the reaper fails the job after `max_job_attempts`).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("lost_workers", sa.Integer(), nullable=False, server_default="0"))
    op.create_table(
        "checkpoints",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("base_model", sa.String(length=200), nullable=False),
        sa.Column("base_model_revision", sa.String(length=64), nullable=True),
        sa.Column("method", sa.String(length=64), nullable=False),
        sa.Column("format", sa.String(length=32), nullable=False),
        sa.Column("storage_key", sa.String(length=1024), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("state_key", sa.String(length=1024), nullable=False),
        sa.Column("state_size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_checkpoints_job_step", "checkpoints", ["job_id", "step"])
    op.create_index("ix_checkpoints_tenant_id", "checkpoints", ["tenant_id"])


def downgrade() -> None:
    op.drop_index("ix_checkpoints_tenant_id", table_name="checkpoints")
    op.drop_index("ix_checkpoints_job_step", table_name="checkpoints")
    op.drop_table("checkpoints")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("lost_workers")
