"""Continuing from a fine-tuned model: a job whose base model is one of the tenant's adapters or checkpoints (by id,
or an adapter by name, as `/v1/models` lists them) starts from its weights, with its method, on its base model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.adapters.service import get_servable
from app.core.errors import ErrorCode, InvalidInput, NotFound, clip
from app.core.models import Adapter, Job
from app.ml.objectives import INIT_FROM, method_own_fields
from app.models.repository import find_model

FINE_TUNED_PREFIXES = ("adapter-", "ftckpt-")


@dataclass(frozen=True)
class StartingPoint:
    """An adapter or checkpoint a job starts from, and what it was trained as."""

    id: str
    base_model: str
    base_model_revision: str | None
    method: str
    hyperparameters: dict[str, Any]  # the stored hyperparameters of the job that trained it


def starting_point(session: Session, *, tenant_id: str, model: str, param: str = "base_model") -> StartingPoint | None:
    """The fine-tuned model `model` names, or None when it names no adapter (a base model, or nothing: the
    caller's base-model lookup says so). Another tenant's adapter is unknown here, as a missing one is."""
    if not model.startswith(FINE_TUNED_PREFIXES):
        if find_model(session, model) is not None:
            return None
        named = session.scalars(
            select(Adapter.id)
            .where(Adapter.tenant_id == tenant_id, Adapter.name == model)
            .order_by(Adapter.created_at.desc())
            .limit(1)
        ).first()
        if named is None:
            return None
        model = named
    try:
        row = get_servable(session, tenant_id=tenant_id, adapter_id=model, param=param)
    except NotFound:
        raise InvalidInput(
            f"{param}: no base model, adapter or checkpoint {clip(model)} (GET /v1/models lists them)",
            param=param,
            code=ErrorCode.model_not_found,
        ) from None
    job = session.get(Job, row.job_id)
    return StartingPoint(
        id=row.id,
        base_model=row.base_model,
        base_model_revision=row.base_model_revision,
        method=row.method,
        hyperparameters=dict(job.hyperparameters) if job is not None else {},
    )


def with_inherited(start: StartingPoint, values: dict[str, Any]) -> dict[str, Any]:
    """The request's hyperparameters with the method's own ones (lora_r, num_virtual_tokens, …: what shapes the
    weights) taken from the job that trained the starting point where the request leaves them out."""
    inherited = {
        name: start.hyperparameters[name] for name in method_own_fields(start.method) if name in start.hyperparameters
    }
    return {**inherited, **values}


def check_same_shape(start: StartingPoint, checked: dict[str, Any]) -> None:
    """Refuse a method hyperparameter that differs from the starting point's (its weights would not fit)."""
    for name in method_own_fields(start.method):
        if name in start.hyperparameters and checked.get(name) != start.hyperparameters[name]:
            raise InvalidInput(
                f"hyperparameters.{name}: the job continues from {start.id}, trained with {name}="
                f"{start.hyperparameters[name]!r}; leave it out or give the same value",
                param=f"hyperparameters.{name}",
            )


def stored(hyperparameters: dict[str, Any], start: StartingPoint | None) -> dict[str, Any]:
    """What a job stores as its hyperparameters: these, and the fine-tuned model it starts from."""
    return {**hyperparameters, INIT_FROM: start.id} if start is not None else hyperparameters
