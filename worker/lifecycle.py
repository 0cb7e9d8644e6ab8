"""The worker's side of a job's life: it claims the job for one attempt, reports the attempt's progress, keeps a
heartbeat and ends the attempt, each write through the job state machine (app/jobs/state.py).

Every write after the claim is conditioned on the attempt, so a worker that lost the job to another (it stopped
answering, then came back) can change nothing. Writes retry while the database is unreachable, for
`db_retry_seconds`; after that the job is left to the reaper (app/jobs/reaper.py).
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError

from app.core.db import session_scope
from app.core.models import Adapter, JobEvent
from app.core.settings import Settings
from app.core.storage import ObjectStorage
from app.jobs import state
from app.jobs.events import append_event, keeps_metrics_event
from app.jobs.state import ClaimedJob
from app.ml.training import StopRequested

if TYPE_CHECKING:
    from app.ml.device import Placement

log = logging.getLogger(__name__)
T = TypeVar("T")

_stop_requested = threading.Event()


def request_stop() -> None:
    """Called when the worker begins to shut down (Ctrl-C, SIGTERM)."""
    _stop_requested.set()


def stop_requested() -> bool:
    """The recipe's stop signal: the running job checkpoints at its next step and goes back to the queue."""
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


class JobAttempt:
    """One attempt at a claimed job, as the worker that runs it writes it: each move of the state machine,
    retried while the database is away, in a transaction of its own."""

    def __init__(self, settings: Settings, storage: ObjectStorage, job: ClaimedJob) -> None:
        self.settings = settings
        self.storage = storage
        self.job = job

    def _move(self, name: str, what: str, *, retry_seconds: float | None = None, **kwargs: Any) -> bool:
        def write() -> bool:
            with session_scope(self.settings.db_url) as session:
                return state.transition(
                    session, self.job.id, name, attempt=self.job.attempt, storage=self.storage, **kwargs
                )

        seconds = self.settings.db_retry_seconds if retry_seconds is None else retry_seconds
        return retrying(seconds, what, write)

    def succeed(self, adapter: Adapter) -> bool:
        """running -> succeeded with its adapter row, atomically; False if the job was cancelled or taken over."""

        def write() -> bool:
            with session_scope(self.settings.db_url) as session:
                moved = state.transition(
                    session,
                    self.job.id,
                    "succeed",
                    attempt=self.job.attempt,
                    storage=self.storage,
                    values={"adapter_id": adapter.id},
                    message=f"training succeeded; adapter {adapter.id} published",
                    data={"adapter_id": adapter.id},
                )
                if moved and session.get(Adapter, adapter.id) is None:  # a retry finds it stored already
                    session.add(adapter)
                return moved

        return retrying(self.settings.db_retry_seconds, "publishing the adapter", write)

    def fail(self, message: str, *, code: str) -> None:
        """running -> failed, with a stable `code` and a message written for the user (no paths, hosts or library
        errors); only while this attempt runs it (not once the reaper has queued it again)."""
        self._move(
            "fail",
            "failing the job",
            values={"error": message, "error_code": code},
            message=message,
            data={"code": code},
            level="error",
        )

    def hand_back(self, step: int | None, *, reason: str | None = None) -> bool:
        """running -> queued, when the worker stops gracefully (or, `reason`, this attempt could not start): another
        worker resumes it from its checkpoint. False if this attempt no longer owns the running job."""
        where = f" at step {step}" if step is not None else ""
        why = reason or f"the worker was stopped{where}"
        return self._move(
            "hand_back",
            "handing the job back",
            retry_seconds=min(self.settings.db_retry_seconds, 10),
            values={"heartbeat_at": None},
            message=f"{why}; the job is back in the queue and resumes from its latest checkpoint",
            data={"step": step},
        )

    def pause(self, step: int | None) -> bool:
        """running -> paused, asked by the user, once the current step is checkpointed: the worker moves on, and
        `resume` queues the job to continue from that checkpoint. False if this attempt no longer owns it."""
        where = f" at step {step}" if step is not None else ""
        return self._move(
            "paused",
            "pausing the job",
            retry_seconds=min(self.settings.db_retry_seconds, 10),
            values={"heartbeat_at": None, "pause_requested_at": None},
            message=f"job paused{where}; resume it to continue from its latest checkpoint",
            data={"step": step},
        )

    def lose(self, why: str) -> bool:
        """Part of this attempt died (one of a job's ranks, say): counted as a lost worker, as the reaper counts
        one. The job goes back to the queue (True: its task is to be sent), or fails once it has lost
        `max_job_attempts` (False); False too if this attempt no longer owns it."""
        from app.core.error_codes import ErrorCode
        from app.core.models import Job
        from app.jobs.reaper import lost_job_message

        def write() -> bool:
            with session_scope(self.settings.db_url) as session:
                lost = session.scalar(select(Job.lost_workers).where(Job.id == self.job.id)) or 0
                common: dict[str, Any] = {"attempt": self.job.attempt, "storage": self.storage}
                if lost + 1 >= self.settings.max_job_attempts:
                    message = lost_job_message(lost + 1)
                    state.transition(
                        session,
                        self.job.id,
                        "lose_for_good",
                        message=message,
                        data={"code": ErrorCode.worker_lost},
                        level="error",
                        values={"lost_workers": lost + 1, "error": message, "error_code": ErrorCode.worker_lost},
                        **common,
                    )
                    return False
                return state.transition(
                    session,
                    self.job.id,
                    "requeue_lost",
                    message=f"{why}; the job is back in the queue and resumes from its latest checkpoint",
                    data={"attempt": self.job.attempt},
                    level="warning",
                    values={"lost_workers": lost + 1, "heartbeat_at": None},
                    **common,
                )

        return retrying(min(self.settings.db_retry_seconds, 10), "re-queueing the job", write)

    def unhand(self) -> None:
        """The task of a handed-back job could not be sent: running again, with a heartbeat already stale, so that
        the reaper sends it (and marks it queued) once the broker answers."""
        with session_scope(self.settings.db_url) as session:
            state.transition(
                session,
                self.job.id,
                "unhand",
                attempt=self.job.attempt,
                values={"heartbeat_at": state.STALE},
                message=None,  # the reaper's event says what happens next
            )

    def has_ended(self) -> bool:
        """Whether the job reached a final state on this attempt (so nothing will resume it)."""
        try:
            with session_scope(self.settings.db_url) as session:
                return state.has_ended(session, self.job.id, self.job.attempt)
        except (OperationalError, InterfaceError):
            return False


def claim(settings: Settings, job_id: str) -> ClaimedJob | None:
    """The job, claimed for a new attempt by this worker, or None if it cannot be taken."""
    with session_scope(settings.db_url) as session:
        return state.claim(
            session,
            job_id,
            heartbeat_timeout=settings.heartbeat_timeout_seconds,
            max_attempts=settings.max_job_attempts,
        )


# Events with a step that a resumed run reports again: each step appears once in the job's events.
STEP_EVENTS = ("metrics", "eval")


class JobReporter:
    """The recipe's reporter for a claimed job: progress and metrics to the job row and its event log, as the
    job's owner for one attempt. Its writes raise JobCancelled or JobLost (app/jobs/state.py) to stop the
    recipe; `check_cancelled` raises StopRequested when the worker is shutting down."""

    def __init__(self, db_url: str, job: ClaimedJob, *, retry_seconds: float = 0.0) -> None:
        self.db_url = db_url
        self.job_id = job.id
        self.attempt = job.attempt
        self.retry_seconds = retry_seconds
        # Steps an earlier attempt reported (a run that resumes from a checkpoint trains them again).
        self.reported: dict[str, int] = self._reported_steps() if job.attempt > 1 else {}
        # Whether its user asked to pause it (`pause_requested_at`), as last read with the job's row.
        self.pause_requested = False

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

    def event(self, type_: str, message: str, data: dict[str, Any] | None = None, level: str = "info") -> None:
        def write() -> None:
            with session_scope(self.db_url) as session:
                state.owned(session, self.job_id, self.attempt, running=False)  # also after a cancel
                append_event(session, self.job_id, type_, message, data, level=level)

        self._write("writing an event", write)

    def placement(self, placement: Placement) -> None:
        """Record where the job trains, on its row and as an event (e.g. "cuda:0 (NVIDIA H200), bfloat16")."""

        def write() -> None:
            with session_scope(self.db_url) as session:
                job = state.owned(session, self.job_id, self.attempt)
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
                job = state.owned(session, self.job_id, self.attempt)
                self.pause_requested = job.pause_requested_at is not None
                merged = dict(job.metrics)
                merged.update(metrics)
                job.metrics = merged
                job.step = step
                job.total_steps = total_steps
                job.epoch = epoch
                state.beat(session, self.job_id, self.attempt)
                if step > self.reported.get(type_, -1) and (
                    type_ != "metrics" or keeps_metrics_event(step, total_steps)
                ):
                    append_event(session, self.job_id, type_, message, {"step": step, "epoch": epoch, **metrics})

        self._write("recording progress", write)

    def note(self, metrics: dict[str, Any]) -> None:
        """Add to the job's metrics without an event (what the run measured of itself: its peak memory)."""

        def write() -> None:
            with session_scope(self.db_url) as session:
                job = state.owned(session, self.job_id, self.attempt)
                job.metrics = {**job.metrics, **metrics}

        self._write("recording the job's metrics", write)

    def check_cancelled(self) -> None:
        if stop_requested():
            raise StopRequested()

        def read() -> None:
            with session_scope(self.db_url) as session:
                job = state.owned(session, self.job_id, self.attempt)
                self.pause_requested = job.pause_requested_at is not None

        self._write("checking the job's status", read)

    def should_stop(self) -> bool:
        """The recipe's stop signal: the worker is shutting down, or the job's user asked to pause it (read at each
        step's progress). Either way the run checkpoints its current step and stops."""
        return stop_requested() or self.pause_requested


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
                    state.beat(session, self.job.id, self.job.attempt)
            except Exception as exc:  # the database is away: the next beat tries again
                log.warning("job %s: heartbeat not written (%s)", self.job.id, type(exc).__name__)
