"""Job state transitions made by the worker, each atomic and each recorded in the event log."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import select, update

from app.core.db import session_scope
from app.core.job_events import append_event
from app.core.models import Adapter, Job, JobStatus, utcnow

if TYPE_CHECKING:
    from app.ml.device import Placement


class JobCancelled(Exception):
    """The job was cancelled while it ran; the runner stops without publishing."""


class WorkerStopping(Exception):
    """The worker process is shutting down; the running job stops at its next step."""


_stop_requested = threading.Event()


def request_stop() -> None:
    """Called when the worker begins to shut down (Ctrl-C, SIGTERM)."""
    _stop_requested.set()


@dataclass(frozen=True)
class ClaimedJob:
    id: str
    tenant_id: str
    base_model: str
    base_model_revision: str | None
    method: str
    training_file_key: str
    validation_file_key: str | None
    suffix: str | None
    hyperparameters: dict[str, Any]
    attempt: int


def claim(db_url: str, job_id: str) -> ClaimedJob | None:
    """queued -> running, for exactly one worker; None if the job is not queued (so a task is safe twice)."""
    from app.core.models import File

    with session_scope(db_url) as session:
        claimed = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.queued)
            .values(status=JobStatus.running, attempt=Job.attempt + 1, started_at=utcnow(), heartbeat_at=utcnow())
        )
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            return None
        job = session.scalars(select(Job).where(Job.id == job_id)).one()
        append_event(session, job_id, "status", "training started", {"status": "running", "attempt": job.attempt})
        train_key = session.scalars(select(File.storage_key).where(File.id == job.training_file_id)).one()
        valid_key = None
        if job.validation_file_id:
            valid_key = session.scalars(select(File.storage_key).where(File.id == job.validation_file_id)).one()
        return ClaimedJob(
            id=job.id,
            tenant_id=job.tenant_id,
            base_model=job.base_model,
            base_model_revision=job.base_model_revision,
            method=job.method,
            training_file_key=train_key,
            validation_file_key=valid_key,
            suffix=job.suffix,
            hyperparameters=dict(job.hyperparameters),
            attempt=job.attempt,
        )


class Reporter(Protocol):
    """Where a training recipe reports to. Progress and checks raise JobCancelled or WorkerStopping to stop it."""

    def event(self, type_: str, message: str, data: dict[str, Any] | None = None, level: str = "info") -> None: ...

    def placement(self, placement: Placement) -> None: ...

    def progress(
        self, *, step: int, total_steps: int, epoch: int, metrics: dict[str, Any], message: str, type_: str = "metrics"
    ) -> None: ...

    def check_cancelled(self) -> None: ...


class JobReporter:
    """Writes progress and metrics to the job row and event log; raises JobCancelled when asked to stop."""

    def __init__(self, db_url: str, job_id: str) -> None:
        self.db_url = db_url
        self.job_id = job_id

    def event(self, type_: str, message: str, data: dict[str, Any] | None = None, level: str = "info") -> None:
        with session_scope(self.db_url) as session:
            append_event(session, self.job_id, type_, message, data, level=level)

    def placement(self, placement: Placement) -> None:
        """Record where the job trains, on its row and as an event (e.g. "cuda:0 (NVIDIA H200), bfloat16")."""
        with session_scope(self.db_url) as session:
            session.execute(
                update(Job).where(Job.id == self.job_id).values(device=placement.device_str, dtype=placement.dtype_str)
            )
            append_event(
                session,
                self.job_id,
                "log",
                f"training on {placement.describe()}",
                {"device": placement.device_str, "device_name": placement.device_name, "dtype": placement.dtype_str},
            )

    def progress(
        self, *, step: int, total_steps: int, epoch: int, metrics: dict[str, Any], message: str, type_: str = "metrics"
    ) -> None:
        if _stop_requested.is_set():
            raise WorkerStopping()
        with session_scope(self.db_url) as session:
            job = session.scalars(select(Job).where(Job.id == self.job_id)).one()
            if job.status != JobStatus.running:
                raise JobCancelled(job.status.value)
            merged = dict(job.metrics)
            merged.update(metrics)
            job.metrics = merged
            job.step = step
            job.total_steps = total_steps
            job.epoch = epoch
            job.heartbeat_at = utcnow()
            append_event(session, self.job_id, type_, message, {"step": step, "epoch": epoch, **metrics})

    def check_cancelled(self) -> None:
        if _stop_requested.is_set():
            raise WorkerStopping()
        with session_scope(self.db_url) as session:
            status = session.scalar(select(Job.status).where(Job.id == self.job_id))
            if status != JobStatus.running:
                raise JobCancelled(str(status))


def succeed(db_url: str, job: ClaimedJob, adapter: Adapter) -> bool:
    """running -> succeeded with its adapter row, atomically; False if the job was cancelled meanwhile."""
    with session_scope(db_url) as session:
        done = session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == JobStatus.running, Job.attempt == job.attempt)
            .values(status=JobStatus.succeeded, adapter_id=adapter.id, finished_at=utcnow())
        )
        if done.rowcount != 1:  # type: ignore[attr-defined]
            return False
        session.add(adapter)
        session.flush()
        append_event(
            session,
            job.id,
            "status",
            f"training succeeded; adapter {adapter.id} published",
            {"status": "succeeded", "adapter_id": adapter.id},
        )
        return True


def fail(db_url: str, job_id: str, message: str, *, code: str) -> None:
    """-> failed, with a stable `code` and a message written for the user (no paths, hosts or library errors)."""
    with session_scope(db_url) as session:
        done = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_((JobStatus.running, JobStatus.queued)))
            .values(status=JobStatus.failed, error=message, error_code=code, finished_at=utcnow())
        )
        if done.rowcount == 1:  # type: ignore[attr-defined]
            append_event(session, job_id, "status", message, {"status": "failed", "code": code}, level="error")
