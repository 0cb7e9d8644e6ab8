"""Queries on jobs and job events; every one is scoped to a tenant."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session

from app.core.db import locked
from app.core.models import Adapter, Checkpoint, IdempotencyKey, Job, JobEvent
from app.core.pagination import newest_first


def get_job(session: Session, *, tenant_id: str, job_id: str, for_update: bool = False) -> Job | None:
    """`for_update` locks the row (PostgreSQL) as the worker that runs the job does before each write of its own."""
    query = select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id)
    return session.scalar(locked(session, query) if for_update else query)


def list_jobs(session: Session, *, tenant_id: str, limit: int, after: Job | None) -> tuple[list[Job], bool]:
    return newest_first(session, select(Job).where(Job.tenant_id == tenant_id), Job, limit=limit, after=after)


def event_data(session: Session, *, job_id: str, type_: str, max_rows: int) -> list[dict[str, Any]]:
    """The `data` of the job's events of this type, in seq order: at most `max_rows` (at least 2) of them, the
    first, every k-th after it and the last, chosen by the database (a long job's thousands of rows are counted
    and numbered there, never sent here)."""
    of_type = (JobEvent.job_id == job_id, JobEvent.type == type_)
    count = session.scalar(select(func.count()).select_from(JobEvent).where(*of_type)) or 0
    if count <= max_rows:
        return list(session.scalars(select(JobEvent.data).where(*of_type).order_by(JobEvent.seq)))
    every = -(-(count - 1) // (max_rows - 1))  # rows 1, 1 + every, …: at most max_rows - 1 of them, then the last
    numbered = select(JobEvent.id, func.row_number().over(order_by=JobEvent.seq).label("n")).where(*of_type).subquery()
    picked = select(numbered.c.id).where(
        numbered.c.n <= count, or_((numbered.c.n - 1) % every == 0, numbered.c.n == count)
    )
    return list(session.scalars(select(JobEvent.data).where(JobEvent.id.in_(picked)).order_by(JobEvent.seq)))


def list_events(session: Session, *, job_id: str, after_seq: int, limit: int) -> list[JobEvent]:
    return list(
        session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.seq > after_seq)
            .order_by(JobEvent.seq)
            .limit(limit)
        )
    )


def list_events_newest_first(session: Session, *, job_id: str, before_seq: int | None, limit: int) -> list[JobEvent]:
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    if before_seq is not None:
        query = query.where(JobEvent.seq < before_seq)
    return list(session.scalars(query.order_by(JobEvent.seq.desc()).limit(limit)))


def list_checkpoints(session: Session, *, job_id: str) -> list[Checkpoint]:
    """The job's kept checkpoints, latest step first (a job keeps at most 20)."""
    query = select(Checkpoint).where(Checkpoint.job_id == job_id)
    return list(session.scalars(query.order_by(Checkpoint.step.desc(), Checkpoint.created_at.desc())))


def delete_checkpoints(session: Session, *, job_id: str, checkpoint_id: str | None = None) -> list[Checkpoint]:
    """Delete the job's checkpoint rows (one, with `checkpoint_id`); the rows as they were. One statement: a row
    a worker records meanwhile is either deleted and returned here, or recorded after (and refused, the job gone)."""
    query = delete(Checkpoint).where(Checkpoint.job_id == job_id)
    if checkpoint_id is not None:
        query = query.where(Checkpoint.id == checkpoint_id)
    return list(session.scalars(query.returning(Checkpoint)))


def delete_job(session: Session, *, job_id: str) -> tuple[list[Checkpoint], list[Adapter]]:
    """Delete the job's row with its events, checkpoints, adapter and the idempotency keys that name it; the
    checkpoint and adapter rows as they were (their objects are the caller's to delete)."""
    checkpoints = delete_checkpoints(session, job_id=job_id)
    adapters = list(session.scalars(delete(Adapter).where(Adapter.job_id == job_id).returning(Adapter)))
    session.execute(delete(JobEvent).where(JobEvent.job_id == job_id))
    session.execute(delete(IdempotencyKey).where(IdempotencyKey.resource_id == job_id))  # the key may create anew
    session.execute(delete(Job).where(Job.id == job_id))
    return checkpoints, adapters
