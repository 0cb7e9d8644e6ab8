"""What a tenant keeps stored (files, adapters, checkpoints), and its limit."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.db import locked
from app.core.errors import AppError, ErrorCode
from app.core.models import Adapter, Checkpoint, File, Tenant


class StorageQuotaExceeded(AppError):
    status_code = 403
    type = "invalid_request_error"
    code = ErrorCode.storage_quota_exceeded


def stored_bytes(session: Session, *, tenant_id: str) -> int:
    """Bytes of the tenant's files (not deleted), adapters and checkpoints (artifact and training state)."""
    files = select(func.coalesce(func.sum(File.bytes), 0)).where(File.tenant_id == tenant_id, File.deleted_at.is_(None))
    adapters = select(func.coalesce(func.sum(Adapter.size_bytes), 0)).where(Adapter.tenant_id == tenant_id)
    checkpoints = select(func.coalesce(func.sum(Checkpoint.size_bytes + Checkpoint.state_size_bytes), 0)).where(
        Checkpoint.tenant_id == tenant_id
    )
    return sum(int(session.scalar(query) or 0) for query in (files, adapters, checkpoints))


def lock_tenant(session: Session, tenant_id: str) -> None:
    """Lock the tenant's row until the transaction ends, so that concurrent requests checking one of its limits
    (its active jobs, its stored bytes) wait for each other and see what the first one wrote."""
    session.execute(locked(session, select(Tenant.id).where(Tenant.id == tenant_id)))


def check_storage(session: Session, *, tenant_id: str, adding: int, limit: int, what: str, lock: bool = True) -> None:
    """Refuse `what` if the tenant's stored bytes plus `adding` would pass `limit`. With `lock`, the tenant's row
    is locked (PostgreSQL) until the transaction ends, so concurrent requests cannot together pass it."""
    if lock:
        lock_tenant(session, tenant_id)
    used = stored_bytes(session, tenant_id=tenant_id)
    if used + adding > limit:
        raise StorageQuotaExceeded(
            f"{what} would bring this tenant's stored bytes to {used + adding:,}, past its limit of {limit:,} "
            f"(now {used:,} in files, adapters and checkpoints); delete files, adapters, checkpoints or ended jobs "
            "to make room, or ask the operator to raise the limit"
        )
