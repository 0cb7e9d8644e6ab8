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


# A job's metric events (one per optimizer step) are written for every step up to this one; past it, for every 2nd
# step up to twice as many, every 4th up to 4 times as many, and so on (and always the last step): a job of any
# length keeps a few tens of thousands at most (METRIC_STEPS_IN_FULL / 2 more per doubling of its steps). Its
# row's `metrics` still follow every step; evaluations are all kept.
METRIC_STEPS_IN_FULL = 10_000


def keeps_metrics_event(step: int, total_steps: int | None) -> bool:
    """Whether the metric event of `step` is written (see METRIC_STEPS_IN_FULL)."""
    if step <= METRIC_STEPS_IN_FULL or step == total_steps:
        return True
    stride = 1 << ((step - 1) // METRIC_STEPS_IN_FULL).bit_length()
    return step % stride == 0
