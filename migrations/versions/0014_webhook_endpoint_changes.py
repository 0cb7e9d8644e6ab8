"""Webhook endpoints change: `updated_at` (the last change of URL, events, name or secret), and the secret a
rotation kept valid for a while (`previous_secret` until `previous_secret_expires_at`), with which deliveries are
signed too meanwhile.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("webhook_endpoints") as batch:
        batch.add_column(sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("previous_secret", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("previous_secret_expires_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE webhook_endpoints SET updated_at = created_at")
    with op.batch_alter_table("webhook_endpoints") as batch:
        batch.alter_column("updated_at", existing_type=sa.DateTime(timezone=True), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("webhook_endpoints") as batch:
        batch.drop_column("previous_secret_expires_at")
        batch.drop_column("previous_secret")
        batch.drop_column("updated_at")
