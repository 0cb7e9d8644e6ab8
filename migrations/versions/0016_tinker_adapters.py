"""Tinker's sampler weights are adapters: `adapters.job_id` may be null (weights a Tinker run saved, named by
`adapters.tinker_path`), `tinker_checkpoints.adapter_id` links sampler weights to their adapter row (which owns
their files) and `tinker_checkpoints.expires_at` is when saved weights with a time to live go; `tinker_runs.metrics`
holds a run's step count, tokens and loss curve for the dashboard, `tinker_runs.holder` the API process whose memory
holds the run.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("adapters") as batch:
        batch.alter_column("job_id", existing_type=sa.String(length=64), nullable=True)
        batch.add_column(sa.Column("tinker_path", sa.String(length=400), nullable=True))
    with op.batch_alter_table("tinker_checkpoints") as batch:
        batch.add_column(sa.Column("adapter_id", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_foreign_key(
            "fk_tinker_checkpoints_adapter_id_adapters", "adapters", ["adapter_id"], ["id"], ondelete="CASCADE"
        )
    with op.batch_alter_table("tinker_runs") as batch:
        batch.add_column(sa.Column("metrics", sa.JSON(), nullable=False, server_default=sa.text("'{}'")))
        batch.add_column(sa.Column("holder", sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tinker_runs") as batch:
        batch.drop_column("holder")
        batch.drop_column("metrics")
    with op.batch_alter_table("tinker_checkpoints") as batch:
        batch.drop_constraint("fk_tinker_checkpoints_adapter_id_adapters", type_="foreignkey")
        batch.drop_column("expires_at")
        batch.drop_column("adapter_id")
    op.execute("DELETE FROM adapters WHERE job_id IS NULL")
    with op.batch_alter_table("adapters") as batch:
        batch.drop_column("tinker_path")
        batch.alter_column("job_id", existing_type=sa.String(length=64), nullable=False)
