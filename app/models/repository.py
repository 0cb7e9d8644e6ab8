"""Queries on base models: the built-ins, and the rows of those the operator registered."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.db import lock_for_writing, locked
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
        tool_call_format=row.tool_call_format,
        files=tuple(ModelFile(**item) for item in row.files),
        created_at=row.created_at,
    )


def find_model(session: Session, model_id: str, *, lock: bool = False) -> ModelRecord | None:
    """A built-in or registered model by id, or None. `lock` holds a shared lock on a registered model's row
    until the transaction ends (PostgreSQL), so that it cannot be removed under a job being created."""
    if model_id in BUILTINS:
        return BUILTINS[model_id]
    if "\x00" in model_id:  # no id has one, and PostgreSQL refuses it in a query
        return None
    query = select(RegisteredModel).where(RegisteredModel.id == model_id)
    if lock:
        query = locked(session, query, read=True)
    row = session.scalars(query).one_or_none()
    return record_of(row) if row is not None else None


def all_models(session: Session) -> list[ModelRecord]:
    """Built-ins first, then registered models by id."""
    rows = session.scalars(select(RegisteredModel).order_by(RegisteredModel.id)).all()
    return [*BUILTINS.values(), *(record_of(row) for row in rows)]


# The PostgreSQL advisory lock that `lock_blobs` takes (any number, the same in every process).
BLOBS_LOCK = 7_246_183_501


def lock_blobs(session: Session) -> None:
    """Hold the model blobs' lock until the transaction ends: whoever adds a model checks its blobs are stored
    and commits its row under it, and whoever deletes blobs no model uses decides and deletes under it, so a blob
    a model being added uses is never deleted. PostgreSQL: an advisory lock; SQLite: the database's write lock
    (`lock_for_writing`), which a transaction holds until it ends."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(BLOBS_LOCK)))
    else:
        lock_for_writing(session)


def used_blobs(session: Session) -> set[str]:
    """The sha256 of every file of every registered model."""
    return {item["sha256"] for files in session.scalars(select(RegisteredModel.files)) for item in files}
