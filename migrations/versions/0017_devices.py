"""Jobs across several devices: `jobs.devices` (how many a job trains on, 1 before), and `workers`: each training
worker's devices, seen at its reaper's every round, so that a job no running worker can take says so.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("devices", sa.Integer(), nullable=False, server_default="1"))
    op.create_table(
        "workers",
        sa.Column("id", sa.String(length=200), primary_key=True),
        sa.Column("devices", sa.Integer(), nullable=False),
        sa.Column("device_type", sa.String(length=16), nullable=False),
        sa.Column("trains_on_cuda", sa.Boolean(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("workers")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("devices")
