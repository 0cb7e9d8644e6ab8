"""Tool calling in training files: `base_models.tool_call_format`, how a registered model's chat template writes
tool calls (null: no tool support), and `files.has_tools`, whether a file's lines use tool calling (jobs on it need
a model with tool support).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-10
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("base_models") as batch:
        batch.add_column(sa.Column("tool_call_format", sa.String(length=32), nullable=True))
    with op.batch_alter_table("files") as batch:
        batch.add_column(sa.Column("has_tools", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("files") as batch:
        batch.drop_column("has_tools")
    with op.batch_alter_table("base_models") as batch:
        batch.drop_column("tool_call_format")
