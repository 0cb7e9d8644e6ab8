"""Hardening: when a key was last used, the longest example of a file, a stable code for job errors.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("files") as batch:
        # Files uploaded before this revision: 0 means "not measured" (the job check then trusts max_seq_length).
        batch.add_column(sa.Column("max_example_tokens", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("error_code", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("error_code")
    with op.batch_alter_table("files") as batch:
        batch.drop_column("max_example_tokens")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("last_used_at")
