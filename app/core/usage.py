"""What a tenant keeps stored (files, adapters, checkpoints) or has reserved for its active jobs, and its limit."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.db import locked
from app.core.errors import AppError, ErrorCode
from app.core.models import ACTIVE_STATUSES, Adapter, Checkpoint, File, Job, Tenant, TinkerCheckpoint


class StorageQuotaExceeded(AppError):
    status_code = 403
    type = "invalid_request_error"
    code = ErrorCode.storage_quota_exceeded


def stored_bytes(session: Session, *, tenant_id: str, excluding_job: str | None = None) -> int:
    """Bytes of the tenant's files (not deleted), adapters and checkpoints (artifact and training state), the states
    its Tinker runs saved (their sampler weights are adapters), and what its active jobs reserved and have not
    stored yet (`reserved_bytes`), but for `excluding_job`'s reservation."""
    files = select(func.coalesce(func.sum(File.bytes), 0)).where(File.tenant_id == tenant_id, File.deleted_at.is_(None))
    adapters = select(func.coalesce(func.sum(Adapter.size_bytes), 0)).where(Adapter.tenant_id == tenant_id)
    checkpoints = select(func.coalesce(func.sum(Checkpoint.size_bytes + Checkpoint.state_size_bytes), 0)).where(
        Checkpoint.tenant_id == tenant_id
    )
    states = select(func.coalesce(func.sum(TinkerCheckpoint.size_bytes), 0)).where(
        TinkerCheckpoint.tenant_id == tenant_id, TinkerCheckpoint.adapter_id.is_(None)
    )
    stored = sum(int(session.scalar(query) or 0) for query in (files, adapters, checkpoints, states))
    return stored + reserved_bytes(session, tenant_id=tenant_id, excluding_job=excluding_job)


def reserved_bytes(session: Session, *, tenant_id: str, excluding_job: str | None = None) -> int:
    """What the tenant's active jobs (at most its active-jobs limit) reserved at creation, less what each of them
    has stored so far in checkpoints and its adapter: room no upload or other job may take."""
    query = select(Job.id, Job.reserved_bytes).where(
        Job.tenant_id == tenant_id, Job.status.in_(ACTIVE_STATUSES), Job.reserved_bytes > 0
    )
    if excluding_job is not None:
        query = query.where(Job.id != excluding_job)
    reserved = {job_id: int(size) for job_id, size in session.execute(query)}
    if not reserved:
        return 0
    stored: dict[str, int] = dict.fromkeys(reserved, 0)
    for job_id, size in session.execute(
        select(Checkpoint.job_id, func.sum(Checkpoint.size_bytes + Checkpoint.state_size_bytes))
        .where(Checkpoint.job_id.in_(reserved))
        .group_by(Checkpoint.job_id)
    ):
        stored[job_id] += int(size or 0)
    for adapter_job, size in session.execute(
        select(Adapter.job_id, Adapter.size_bytes).where(Adapter.job_id.in_(reserved))
    ):
        if adapter_job is not None:
            stored[adapter_job] += int(size or 0)
    return sum(max(0, size - stored[job_id]) for job_id, size in reserved.items())


def lock_tenant(session: Session, tenant_id: str) -> None:
    """Lock the tenant's row until the transaction ends, so that concurrent requests checking one of its limits
    (its active jobs, its stored bytes) wait for each other and see what the first one wrote."""
    session.execute(locked(session, select(Tenant.id).where(Tenant.id == tenant_id)))


def check_storage(
    session: Session,
    *,
    tenant_id: str,
    adding: int,
    limit: int,
    what: str,
    lock: bool = True,
    for_job: str | None = None,
) -> None:
    """Refuse `what` if the tenant's stored and reserved bytes plus `adding` would pass `limit`. With `lock`, the
    tenant's row is locked (PostgreSQL) until the transaction ends, so concurrent requests cannot together pass it.
    `for_job`: what a job stores, which its own reservation was made for (not counted against it)."""
    if lock:
        lock_tenant(session, tenant_id)
    used = stored_bytes(session, tenant_id=tenant_id, excluding_job=for_job)
    if used + adding > limit:
        raise StorageQuotaExceeded(
            f"{what} would bring this tenant's stored bytes to {used + adding:,}, past its limit of {limit:,} "
            f"(now {used:,} in files, adapters, checkpoints and what its active jobs reserved); delete files, "
            "adapters, checkpoints or ended jobs, or cancel a job, to make room, or ask the operator to raise the limit"
        )
