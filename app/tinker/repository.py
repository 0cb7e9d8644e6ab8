"""Queries on the weights Tinker runs saved (each scoped to a tenant), and what the rest of Tuneforge serves them
as: a LoRA adapter reference."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.core.models import Adapter, TinkerCheckpoint, TinkerRun, utcnow
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


def delete_saved(session: Session, checkpoint: TinkerCheckpoint) -> None:
    """Delete the checkpoint's row, and for sampler weights the adapter they are (the caller deletes the files once
    the transaction commits)."""
    adapter_id = checkpoint.adapter_id
    session.delete(checkpoint)
    session.flush()
    if adapter_id is not None:
        session.execute(delete(Adapter).where(Adapter.id == adapter_id))


def expiry(ttl_seconds: int | None) -> datetime | None:
    """When saved weights with this time to live are deleted (none: kept)."""
    return utcnow() + timedelta(seconds=ttl_seconds) if ttl_seconds else None
