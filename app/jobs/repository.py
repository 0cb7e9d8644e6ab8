"""Queries on jobs and job events; every one is scoped to a tenant."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.models import Checkpoint, Job, JobEvent
from app.core.pagination import newest_first


def get_job(session: Session, *, tenant_id: str, job_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))


def list_jobs(session: Session, *, tenant_id: str, limit: int, after: Job | None) -> tuple[list[Job], bool]:
    return newest_first(session, select(Job).where(Job.tenant_id == tenant_id), Job, limit=limit, after=after)


def event_data(session: Session, *, job_id: str, types: tuple[str, ...]) -> list[dict[str, Any]]:
    """The `data` of the job's events of these types, in seq order."""
    query = select(JobEvent.data).where(JobEvent.job_id == job_id, JobEvent.type.in_(types)).order_by(JobEvent.seq)
    return list(session.scalars(query))


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
