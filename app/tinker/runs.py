"""Tinker training runs in Tuneforge's own REST shape (`GET /training_runs`, with a Tuneforge key as everywhere):
what the dashboard shows of a run — its settings, steps, tokens and loss curve, and the weights it saved (sampler
weights with the id of the adapter they are). Tinker's client lists runs at `/api/v1/training_runs` (endpoints.py)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path
from pydantic import Field
from sqlalchemy import select

from app.core.deps import SessionDep, TenantDep
from app.core.errors import NotFound, clip, error_responses
from app.core.models import TinkerCheckpoint, TinkerRun
from app.core.pagination import DEFAULT_LIMIT, AfterQuery, LimitQuery, ListPage, cursor_row, newest_first
from app.core.schemas import Schema, UnixTime

router = APIRouter(prefix="/training_runs", tags=["training runs"], responses=error_responses(401, 404, 422))


class SavedWeights(Schema):
    tinker_path: str
    kind: Literal["training", "sampler"] = Field(description="`training`: save_state's; `sampler`: for sampling")
    adapter_id: str | None = Field(description="Sampler weights are this adapter (/adapters, /generate)")
    size_bytes: int
    created_at: UnixTime


class TrainingRunObject(Schema):
    id: str = Field(description="The run's id, as Tinker's client names it (`<session>:train:<n>`)")
    object: Literal["training_run"] = "training_run"
    base_model: str
    lora_rank: int
    lora_config: dict[str, Any] = Field(description="rank, seed, train_attn, train_mlp, train_unembed")
    steps: int = Field(description="Optimizer steps taken")
    trained_tokens: int = Field(description="Tokens of the forward/backward passes")
    loss: list[tuple[int, float]] = Field(
        description="[step, loss per loss-bearing token of the passes before that step], the latest 1000 steps"
    )
    checkpoints: list[SavedWeights]
    created_at: UnixTime
    last_request_at: UnixTime


RunId = Annotated[str, Path(max_length=128)]


@router.get("")
def list_training_runs(
    session: SessionDep, tenant: TenantDep, limit: LimitQuery = DEFAULT_LIMIT, after: AfterQuery = None
) -> ListPage[TrainingRunObject]:
    """The tenant's Tinker training runs, newest first."""
    cursor = cursor_row(after, lambda id_: _find(session, tenant.id, id_))
    query = select(TinkerRun).where(TinkerRun.tenant_id == tenant.id)
    runs, has_more = newest_first(session, query, TinkerRun, limit=limit, after=cursor)
    return ListPage(data=[_run(session, run) for run in runs], has_more=has_more)


@router.get("/{run_id}")
def get_training_run(run_id: RunId, session: SessionDep, tenant: TenantDep) -> TrainingRunObject:
    run = _find(session, tenant.id, run_id)
    if run is None:
        raise NotFound(f"no training run {clip(run_id)}", param="run_id")
    return _run(session, run)


def _find(session: Any, tenant_id: str, run_id: str) -> TinkerRun | None:
    return session.scalar(select(TinkerRun).where(TinkerRun.id == run_id, TinkerRun.tenant_id == tenant_id))


def _run(session: Any, run: TinkerRun) -> TrainingRunObject:
    saved = session.scalars(
        select(TinkerCheckpoint).where(TinkerCheckpoint.run_id == run.id).order_by(TinkerCheckpoint.created_at.desc())
    ).all()
    metrics = run.metrics or {}
    return TrainingRunObject(
        id=run.id,
        base_model=run.base_model,
        lora_rank=run.lora_rank,
        lora_config=run.lora_config,
        steps=int(metrics.get("steps", 0)),
        trained_tokens=int(metrics.get("tokens", 0)),
        loss=metrics.get("loss", []),
        checkpoints=[
            SavedWeights.model_validate(
                {
                    "tinker_path": c.tinker_path,
                    "kind": c.kind,
                    "adapter_id": c.adapter_id,
                    "size_bytes": c.size_bytes,
                    "created_at": c.created_at,
                }
            )
            for c in saved
        ],
        created_at=run.created_at,  # type: ignore[arg-type]
        last_request_at=run.last_request_at,  # type: ignore[arg-type]
    )
