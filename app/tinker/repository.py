"""Queries on the weights Tinker runs saved (each scoped to a tenant), and what the rest of Tuneforge serves them
as: a LoRA adapter reference."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.models import TinkerCheckpoint, TinkerRun
from app.ml.serving import AdapterRef


def find_saved(session: Session, *, tenant_id: str, path: str) -> tuple[TinkerCheckpoint, TinkerRun] | None:
    """The checkpoint saved at a `tinker://` path, with its run; None if the tenant has none there."""
    row = session.execute(
        select(TinkerCheckpoint, TinkerRun)
        .join(TinkerRun, TinkerRun.id == TinkerCheckpoint.run_id)
        .where(TinkerCheckpoint.tenant_id == tenant_id, TinkerCheckpoint.tinker_path == path)
    ).first()
    return (row[0], row[1]) if row is not None else None


def adapter_ref(checkpoint: TinkerCheckpoint) -> AdapterRef:
    """The checkpoint as the serving engine loads adapters (its files hold a LoRA in PEFT's format)."""
    return AdapterRef(
        id=f"tinker-{checkpoint.id}", storage_key=checkpoint.storage_key, sha256=checkpoint.sha256, method="lora"
    )
