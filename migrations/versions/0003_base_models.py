"""Base models an operator registers, token counts per tokenizer, where each job trained, and on which
revision of its base model a job and its adapter were made.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The tokenizer identity of the built-in models (app.ml.models.BUILTIN_TOKENIZER), which counted every file
# uploaded before this revision.
BUILTIN_TOKENIZER = "builtin:smollm2"


def upgrade() -> None:
    op.create_table(
        "base_models",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("origin", sa.String(length=256), nullable=True),
        sa.Column("architecture", sa.String(length=64), nullable=False),
        sa.Column("n_parameters", sa.BigInteger(), nullable=False),
        sa.Column("max_seq_length", sa.Integer(), nullable=False),
        sa.Column("chat_template", sa.Boolean(), nullable=False),
        sa.Column("linear_modules", sa.JSON(), nullable=False),
        sa.Column("default_target_modules", sa.JSON(), nullable=False),
        sa.Column("revision", sa.String(length=64), nullable=False),
        sa.Column("tokenizer_sha256", sa.String(length=64), nullable=False),
        sa.Column("files", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_base_models")),
    )
    file_token_counts = op.create_table(
        "file_token_counts",
        sa.Column("file_id", sa.String(length=64), nullable=False),
        sa.Column("tokenizer_sha256", sa.String(length=64), nullable=False),
        sa.Column("n_tokens", sa.BigInteger(), nullable=False),
        sa.Column("max_example_tokens", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["file_id"], ["files.id"], name=op.f("fk_file_token_counts_file_id_files"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("file_id", "tokenizer_sha256", name=op.f("pk_file_token_counts")),
    )
    with op.batch_alter_table("files") as batch:
        batch.add_column(sa.Column("tokenizer_model", sa.String(length=64), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("device", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("dtype", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("base_model_revision", sa.String(length=64), nullable=True))
    with op.batch_alter_table("adapters") as batch:
        batch.add_column(sa.Column("base_model_revision", sa.String(length=64), nullable=True))
    # Files already uploaded were counted with the built-ins' tokenizer; files without a measured longest example
    # (uploaded before revision 0002) are left to be counted again when a job needs it.
    files = sa.table(
        "files",
        sa.column("id", sa.String),
        sa.column("n_tokens", sa.BigInteger),
        sa.column("max_example_tokens", sa.Integer),
        sa.column("created_at", sa.DateTime(timezone=True)),
    )
    op.execute(
        file_token_counts.insert().from_select(
            ["file_id", "tokenizer_sha256", "n_tokens", "max_example_tokens", "created_at"],
            sa.select(
                files.c.id,
                sa.literal(BUILTIN_TOKENIZER),
                files.c.n_tokens,
                files.c.max_example_tokens,
                files.c.created_at,
            ).where(files.c.max_example_tokens > 0),
        )
    )


def downgrade() -> None:
    with op.batch_alter_table("adapters") as batch:
        batch.drop_column("base_model_revision")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("base_model_revision")
        batch.drop_column("dtype")
        batch.drop_column("device")
    with op.batch_alter_table("files") as batch:
        batch.drop_column("tokenizer_model")
    op.drop_table("file_token_counts")
    op.drop_table("base_models")
