"""Job state transitions made by the worker, each atomic and each recorded in the event log.

A worker owns a job for one attempt: `claim` takes it (queued, or running on a worker whose heartbeat went
stale) and bumps `attempt`; every later write is conditioned on that attempt, so a worker that lost the job
to another (it stopped answering, then came back) can change nothing. Writes retry while the database is
unreachable, for `db_retry_seconds`; after that the job is left to the reaper (app/jobs/reaper.py).
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from sqlalchemy import and_, case, or_, select, update
from sqlalchemy.exc import InterfaceError, OperationalError

from app.core.db import session_scope
from app.core.job_events import append_event
from app.core.models import Adapter, File, Job, JobEvent, JobStatus, utcnow

if TYPE_CHECKING:
    from app.ml.device import Placement

log = logging.getLogger(__name__)
T = TypeVar("T")


class JobCancelled(Exception):
    """The job was cancelled while it ran; the runner stops without publishing."""


class JobLost(Exception):
    """Another worker took the job over (this one's heartbeat went stale): stop, and write nothing more."""


class WorkerStopping(Exception):
    """The worker process is shutting down: the job goes back to the queue (checkpointed at `step`, if given)."""

    def __init__(self, step: int | None = None) -> None:
        super().__init__(f"stopped at step {step}" if step is not None else "stopped")
        self.step = step


FINAL_STATUSES = (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)

_stop_requested = threading.Event()


def request_stop() -> None:
    """Called when the worker begins to shut down (Ctrl-C, SIGTERM)."""
    _stop_requested.set()


def stop_requested() -> bool:
    return _stop_requested.is_set()


def retrying(retry_seconds: float, what: str, write: Callable[[], T]) -> T:
    """`write()`, tried again with backoff while the database is unreachable, for up to `retry_seconds`."""
    deadline = time.monotonic() + retry_seconds
    delay = 0.5
    while True:
        try:
            return write()
        except (OperationalError, InterfaceError) as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning(
                "the database did not answer (%s) while %s; trying again in %.1f s", type(exc).__name__, what, delay
            )
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


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


def claimable(job_id: str, *, stale_before: Any, max_attempts: int) -> Any:
    """The condition under which a worker may take a job: queued, or running with a heartbeat older than
    `stale_before` (its worker died) if it may lose one more worker (`max_attempts`)."""
    stale = and_(Job.status == JobStatus.running, Job.heartbeat_at < stale_before, Job.lost_workers + 1 < max_attempts)
    return and_(Job.id == job_id, or_(Job.status == JobStatus.queued, stale))


def claim(db_url: str, job_id: str, *, heartbeat_timeout: float = 120.0, max_attempts: int = 3) -> ClaimedJob | None:
    """-> running with attempt + 1, for exactly one worker; None if the job cannot be taken (finished, cancelled,
    or running on a live worker), so a task delivered twice is harmless."""
    with session_scope(db_url) as session:
        now = utcnow()
        stale_before = now - timedelta(seconds=heartbeat_timeout)
        previous = session.scalar(select(Job.status).where(Job.id == job_id))
        claimed = session.execute(
            update(Job)
            .where(claimable(job_id, stale_before=stale_before, max_attempts=max_attempts))
            .values(
                status=JobStatus.running,
                attempt=Job.attempt + 1,
                lost_workers=Job.lost_workers + case((Job.status == JobStatus.running, 1), else_=0),
                started_at=now,
                heartbeat_at=now,
            )
        )
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            return None
        job = session.scalars(select(Job).where(Job.id == job_id)).one()
        message = "training started"
        if previous == JobStatus.running:
            message = "training started again: the worker that ran the job stopped answering"
        elif job.attempt > 1:
            message = "training started again"
        append_event(session, job_id, "status", message, {"status": "running", "attempt": job.attempt})
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
    """Where a training recipe reports to. Progress and checks raise JobCancelled (or JobLost) to stop it."""

    def event(self, type_: str, message: str, data: dict[str, Any] | None = None, level: str = "info") -> None: ...

    def placement(self, placement: Placement) -> None: ...

    def progress(
        self, *, step: int, total_steps: int, epoch: int, metrics: dict[str, Any], message: str, type_: str = "metrics"
    ) -> None: ...

    def check_cancelled(self) -> None: ...


# Events with a step that a resumed run reports again: each step appears once in the job's events.
STEP_EVENTS = ("metrics", "eval")


class JobReporter:
    """Writes progress and metrics to the job row and event log, as the job's owner for one attempt."""

    def __init__(self, db_url: str, job: ClaimedJob, *, retry_seconds: float = 0.0) -> None:
        self.db_url = db_url
        self.job_id = job.id
        self.attempt = job.attempt
        self.retry_seconds = retry_seconds
        # Steps an earlier attempt reported (a run that resumes from a checkpoint trains them again).
        self.reported: dict[str, int] = self._reported_steps() if job.attempt > 1 else {}

    def _write(self, what: str, write: Callable[[], T]) -> T:
        return retrying(self.retry_seconds, what, write)

    def _reported_steps(self) -> dict[str, int]:
        def read() -> dict[str, int]:
            reported = {}
            with session_scope(self.db_url) as session:
                for type_ in STEP_EVENTS:
                    data = session.scalar(
                        select(JobEvent.data)
                        .where(JobEvent.job_id == self.job_id, JobEvent.type == type_)
                        .order_by(JobEvent.seq.desc())
                        .limit(1)
                    )
                    if data and isinstance(data.get("step"), int):
                        reported[type_] = data["step"]
            return reported

        return self._write("reading the job's events", read)

    def _owned(self, session: Any, *, running: bool = True) -> Job:
        """The job row, locked; JobLost if another attempt owns it, JobCancelled if it is no longer running."""
        job = session.scalars(select(Job).where(Job.id == self.job_id).with_for_update()).one()
        if job.attempt != self.attempt or job.status == JobStatus.queued:  # queued: the reaper gave up on us
            raise JobLost(f"attempt {job.attempt} is {job.status.value}")
        if running and job.status != JobStatus.running:
            raise JobCancelled(job.status.value)
        return job

    def event(self, type_: str, message: str, data: dict[str, Any] | None = None, level: str = "info") -> None:
        def write() -> None:
            with session_scope(self.db_url) as session:
                self._owned(session, running=False)  # also after a cancel: "training stopped"
                append_event(session, self.job_id, type_, message, data, level=level)

        self._write("writing an event", write)

    def placement(self, placement: Placement) -> None:
        """Record where the job trains, on its row and as an event (e.g. "cuda:0 (NVIDIA H200), bfloat16")."""

        def write() -> None:
            with session_scope(self.db_url) as session:
                job = self._owned(session)
                job.device = placement.device_str
                job.dtype = placement.dtype_str
                append_event(
                    session,
                    self.job_id,
                    "log",
                    f"training on {placement.describe()}",
                    {
                        "device": placement.device_str,
                        "device_name": placement.device_name,
                        "dtype": placement.dtype_str,
                    },
                )

        self._write("recording the device", write)

    def progress(
        self, *, step: int, total_steps: int, epoch: int, metrics: dict[str, Any], message: str, type_: str = "metrics"
    ) -> None:
        def write() -> None:
            with session_scope(self.db_url) as session:
                job = self._owned(session)
                merged = dict(job.metrics)
                merged.update(metrics)
                job.metrics = merged
                job.step = step
                job.total_steps = total_steps
                job.epoch = epoch
                job.heartbeat_at = utcnow()
                if step > self.reported.get(type_, -1):
                    append_event(session, self.job_id, type_, message, {"step": step, "epoch": epoch, **metrics})

        self._write("recording progress", write)

    def check_cancelled(self) -> None:
        if _stop_requested.is_set():
            raise WorkerStopping()

        def read() -> None:
            with session_scope(self.db_url) as session:
                self._owned(session)

        self._write("checking the job's status", read)


class Heartbeat:
    """Marks the job alive every `interval` seconds from its own thread, whatever the training loop is doing
    (a step may take minutes on a big model). Writes only while this attempt owns the running job."""

    def __init__(self, db_url: str, job: ClaimedJob, interval: float) -> None:
        self.db_url = db_url
        self.job = job
        self.interval = interval
        self._done = threading.Event()
        # In the job's logging context (its id on the thread's lines too): threads do not inherit context variables.
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._run,), name=f"heartbeat-{job.id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            try:
                with session_scope(self.db_url) as session:
                    session.execute(
                        update(Job)
                        .where(Job.id == self.job.id, Job.attempt == self.job.attempt, Job.status == JobStatus.running)
                        .values(heartbeat_at=utcnow())
                    )
            except Exception as exc:  # the database is away: the next beat tries again
                log.warning("job %s: heartbeat not written (%s)", self.job.id, type(exc).__name__)


def succeed(db_url: str, job: ClaimedJob, adapter: Adapter, *, retry_seconds: float = 0.0) -> bool:
    """running -> succeeded with its adapter row, atomically; False if the job was cancelled or taken over."""

    def write() -> bool:
        with session_scope(db_url) as session:
            done = session.execute(
                update(Job)
                .where(Job.id == job.id, Job.status == JobStatus.running, Job.attempt == job.attempt)
                .values(status=JobStatus.succeeded, adapter_id=adapter.id, finished_at=utcnow())
            )
            if done.rowcount != 1:  # type: ignore[attr-defined]
                # A retry of a write that went through (the answer was lost, not the commit) finds it done.
                return _already(session, job, JobStatus.succeeded, adapter_id=adapter.id)
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

    return retrying(retry_seconds, "publishing the adapter", write)


def _already(session: Any, job: ClaimedJob, status: JobStatus, **values: Any) -> bool:
    row = session.scalars(select(Job).where(Job.id == job.id)).one()
    return bool(
        row.attempt == job.attempt and row.status == status and all(getattr(row, k) == v for k, v in values.items())
    )


def hand_back(db_url: str, job: ClaimedJob, *, step: int | None, retry_seconds: float = 0.0) -> bool:
    """running -> queued, when the worker stops gracefully: another worker resumes it from its checkpoint.
    False if this attempt no longer owns the running job."""

    def write() -> bool:
        with session_scope(db_url) as session:
            done = session.execute(
                update(Job)
                .where(Job.id == job.id, Job.status == JobStatus.running, Job.attempt == job.attempt)
                .values(status=JobStatus.queued, heartbeat_at=None)
            )
            if done.rowcount != 1:  # type: ignore[attr-defined]
                return _already(session, job, JobStatus.queued)
            where = f" at step {step}" if step is not None else ""
            append_event(
                session,
                job.id,
                "status",
                f"the worker was stopped{where}; the job is back in the queue and resumes from its latest checkpoint",
                {"status": "queued", "step": step},
            )
            return True

    return retrying(retry_seconds, "handing the job back", write)


def has_ended(db_url: str, job: ClaimedJob) -> bool:
    """Whether the job reached a final state on this attempt (so nothing will resume it)."""
    try:
        with session_scope(db_url) as session:
            row = session.execute(select(Job.status, Job.attempt).where(Job.id == job.id)).one()
    except (OperationalError, InterfaceError):
        return False
    return row.attempt == job.attempt and row.status in FINAL_STATUSES


def unhand(db_url: str, job: ClaimedJob) -> None:
    """The task of a handed-back job could not be sent: running again, with a heartbeat already stale, so that
    the reaper sends it (and marks it queued) once the broker answers."""
    with session_scope(db_url) as session:
        session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == JobStatus.queued, Job.attempt == job.attempt)
            .values(status=JobStatus.running, heartbeat_at=datetime(2000, 1, 1, tzinfo=UTC))
        )


def fail(db_url: str, job: ClaimedJob, message: str, *, code: str, retry_seconds: float = 0.0) -> None:
    """running -> failed, with a stable `code` and a message written for the user (no paths, hosts or library
    errors); only while this attempt runs it (not once the reaper has queued it again)."""
    condition = [Job.id == job.id, Job.status == JobStatus.running, Job.attempt == job.attempt]

    def write() -> None:
        with session_scope(db_url) as session:
            done = session.execute(
                update(Job)
                .where(*condition)
                .values(status=JobStatus.failed, error=message, error_code=code, finished_at=utcnow())
            )
            if done.rowcount == 1:  # type: ignore[attr-defined]
                append_event(session, job.id, "status", message, {"status": "failed", "code": code}, level="error")

    retrying(retry_seconds, "failing the job", write)
