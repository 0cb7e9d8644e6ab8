"""A job's event log: every status change and metric, numbered by a per-job sequence."""

from __future__ import annotations

from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from app.core.models import Job, JobEvent


def append_event(
    session: Session,
    job_id: str,
    type_: str,
    message: str = "",
    data: dict[str, Any] | None = None,
    *,
    level: str = "info",
) -> int:
    """Append one event; the sequence number comes from an atomic increment on the job row."""
    seq = session.execute(
        update(Job).where(Job.id == job_id).values(last_event_seq=Job.last_event_seq + 1).returning(Job.last_event_seq)
    ).scalar_one()
    session.add(JobEvent(job_id=job_id, seq=seq, type=type_, level=level, message=message, data=data or {}))
    session.flush()
    return int(seq)
