"""Queries on base models: the built-ins, and the rows of those the operator registered."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.models import RegisteredModel
from app.ml.models import BUILTINS, ModelFile, ModelRecord


def record_of(row: RegisteredModel) -> ModelRecord:
    """The record of a `base_models` row."""
    return ModelRecord(
        id=row.id,
        description=row.description,
        source=row.source,
        architecture=row.architecture,
        n_parameters=row.n_parameters,
        max_seq_length=row.max_seq_length,
        chat_template=row.chat_template,
        linear_modules=tuple(row.linear_modules),
        default_target_modules=tuple(row.default_target_modules),
        revision=row.revision,
        tokenizer_sha256=row.tokenizer_sha256,
        origin=row.origin,
        n_layers=row.n_layers,
        files=tuple(ModelFile(**item) for item in row.files),
        created_at=row.created_at,
    )


def find_model(session: Session, model_id: str, *, lock: bool = False) -> ModelRecord | None:
    """A built-in or registered model by id, or None. `lock` holds a shared lock on a registered model's row
    until the transaction ends (PostgreSQL), so that it cannot be removed under a job being created."""
    if model_id in BUILTINS:
        return BUILTINS[model_id]
    query = select(RegisteredModel).where(RegisteredModel.id == model_id)
    if lock:
        query = query.with_for_update(read=True)
    row = session.scalars(query).one_or_none()
    return record_of(row) if row is not None else None


def all_models(session: Session) -> list[ModelRecord]:
    """Built-ins first, then registered models by id."""
    rows = session.scalars(select(RegisteredModel).order_by(RegisteredModel.id)).all()
    return [*BUILTINS.values(), *(record_of(row) for row in rows)]
