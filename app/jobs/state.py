"""A job's states and every change between them, in one place.

`TRANSITIONS` is the whole state machine: each named move, the states it leaves from and the state it reaches.
`transition` is the one function that writes `jobs.status`: a conditional UPDATE (from one of the move's states,
and for a worker's move on the attempt it owns), the status event in the job's log, and, when the job ends, its
checkpoints' training states dropped (nothing will resume from them) and its webhook deliveries recorded (the
outbox: app/webhooks/outbox.py), in the same transaction. `claim`, `owned` and the reaper's moves
build on it, and `job_queue` is the one place that decides which queue a job's task goes to.

    validating_files ──files_validated──► queued ──claim──► running ──succeed──► succeeded
            │                               │  ▲              │ │ │
            └──────────cancel───────────────┤  └─hand_back /  │ │ └──fail / lose_for_good──► failed
                                            │     requeue_lost┘ │
                          dispatch_failed ◄─┘                   └──cancel──► cancelled

    queued ──pause──► paused ◄──paused / pause_lost── running        paused ──resume──► queued
                         └──cancel──► cancelled

(A running job is paused by its own worker: the user's request sets `pause_requested_at`, and the worker
checkpoints after its current step and moves it by `paused`. `claim` also takes a `running` job whose worker's
heartbeat went stale; `unhand` puts a job handed back by a
worker whose task could not be sent back to `running`, stale, for the reaper to send.)

Heartbeats, claims and `queued_at` are written with the database's clock (`db_now`) and compared with it, never
with a host's: a worker whose clock runs behind or ahead neither loses its job nor keeps a dead one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, case, or_, select, update
from sqlalchemy.orm import Session

from app.core.db import locked
from app.core.models import TERMINAL_STATUSES, File, Job, JobStatus, db_now, utcnow
from app.core.queue import cuda_queue, send_training_task
from app.jobs.checkpoints import drop_training_states
from app.jobs.events import append_event
from app.ml.methods import METHODS
from app.webhooks.outbox import record_job_event

if TYPE_CHECKING:
    from app.core.settings import Settings
    from app.core.storage import ObjectStorage

log = logging.getLogger(__name__)

# A heartbeat this old is stale whatever the settings: `unhand` leaves a job for the reaper with it.
STALE = datetime(2000, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Move:
    """One allowed change of a job's status."""

    name: str
    sources: frozenset[JobStatus]
    target: JobStatus


def _move(name: str, sources: set[JobStatus], target: JobStatus) -> Move:
    return Move(name, frozenset(sources), target)


V, Q, R, P = JobStatus.validating_files, JobStatus.queued, JobStatus.running, JobStatus.paused
S, F, C = JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled
TRANSITIONS: dict[str, Move] = {
    move.name: move
    for move in (
        _move("files_validated", {V}, Q),  # POST /jobs, once the files are checked
        _move("dispatch_failed", {Q}, F),  # the broker was unreachable when the job was created
        _move("cancel", {V, Q, R, P}, C),  # the user; a running job's worker stops at its next step
        _move("pause", {Q}, P),  # the user, before a worker took it (a running job: `pause_requested_at`)
        _move("paused", {R}, P),  # the owning attempt, asked to pause, checkpointed after its current step
        _move("pause_lost", {R}, P),  # the reaper: the worker stopped answering while asked to pause
        _move("resume", {P}, Q),  # the user: queued again, to continue from the checkpoint it paused at
        _move("claim", {Q, R}, R),  # a worker takes it (running: only with a stale heartbeat); attempt + 1
        _move("succeed", {R}, S),  # the owning attempt published the adapter
        _move("fail", {R}, F),  # the owning attempt failed, with a code and a message for the user
        _move("hand_back", {R}, Q),  # the owning worker is stopping: another resumes from the checkpoint
        _move("unhand", {Q}, R),  # a hand-back whose task could not be sent: left stale, for the reaper
        _move("requeue_lost", {R}, Q),  # the reaper: the worker stopped answering; sent again
        _move("lose_for_good", {R}, F),  # the reaper: it lost max_job_attempts workers
    )
}


class JobCancelled(Exception):
    """The user cancelled the job while this attempt ran it: the attempt stops without publishing."""


class JobLost(Exception):
    """The job is no longer this attempt's (the reaper re-queued or failed it, another worker took it over): the
    attempt stops and writes nothing more."""


def transition(
    session: Session,
    job_id: str,
    name: str,
    *,
    message: str | None,
    data: dict[str, Any] | None = None,
    level: str = "info",
    attempt: int | None = None,
    where: tuple[Any, ...] = (),
    values: dict[str, Any] | None = None,
    storage: ObjectStorage | None = None,
) -> bool:
    """Move the job by `name` (a key of TRANSITIONS) if it is in one of the move's states (and, with `attempt`,
    on that attempt; and `where` holds), setting `values` too; record the status event (`message`; None for a
    move the next one explains). Returns whether it moved. A job that ends (`finished_at` set) loses its
    checkpoints' training states, deleted from `storage` once the transaction commits, and its end is recorded
    for the tenant's webhook endpoints, to be sent once it commits.

    With `attempt`, a retry of a move that went through (the commit happened, its answer was lost) finds the job
    already there and returns True, without a second event."""
    move = TRANSITIONS[name]
    changes = {"status": move.target, **(values or {})}
    if move.target == JobStatus.queued:  # when it entered the queue: the reaper sends its task again if it stays
        changes.setdefault("queued_at", db_now())
    ends = move.target in TERMINAL_STATUSES
    if ends:
        if storage is None:
            raise ValueError(f"the move {name} ends the job: its checkpoints' storage is needed")
        changes.setdefault("finished_at", utcnow())
    conditions = [Job.id == job_id, Job.status.in_(move.sources), *where]
    if attempt is not None:
        conditions.append(Job.attempt == attempt)
    moved = session.execute(update(Job).where(*conditions).values(**changes)).rowcount == 1  # type: ignore[attr-defined]
    if not moved:
        return attempt is not None and _already(session, job_id, attempt, move.target, values or {})
    if message is not None:
        append_event(session, job_id, "status", message, {"status": move.target.value, **(data or {})}, level=level)
    if ends:
        assert storage is not None
        drop_training_states(session, storage, job_id=job_id)
        record_job_event(session, job_id=job_id, status=move.target)
    return True


def _already(session: Session, job_id: str, attempt: int, status: JobStatus, values: dict[str, Any]) -> bool:
    row = session.scalars(select(Job).where(Job.id == job_id)).one_or_none()
    if row is None:  # deleted by its user once it had ended
        return False
    plain = {k: v for k, v in values.items() if isinstance(v, str | int | None)}  # not SQL expressions or times
    return row.attempt == attempt and row.status == status and all(getattr(row, k) == v for k, v in plain.items())


def create(session: Session, job: Job) -> Job:
    """A new job row, validating its files, with its first event."""
    job.status = JobStatus.validating_files
    session.add(job)
    session.flush()
    append_event(session, job.id, "status", "job created; validating files", {"status": job.status.value})
    return job


def owned(session: Session, job_id: str, attempt: int, *, running: bool = True) -> Job:
    """The job row, locked, for a write by the attempt that runs it: JobLost if it is no longer that attempt's,
    JobCancelled if the user cancelled it (with `running=False`, a cancelled job is still returned: the attempt
    may say that it stopped)."""
    job = session.scalars(locked(session, select(Job).where(Job.id == job_id))).one_or_none()
    if job is None:  # cancelled, then deleted by its user
        raise JobLost("the job was deleted")
    if job.attempt != attempt or job.status not in (JobStatus.running, JobStatus.cancelled):
        raise JobLost(f"attempt {job.attempt} is {job.status.value}")
    if running and job.status == JobStatus.cancelled:
        raise JobCancelled(job.status.value)
    return job


def request_pause(session: Session, job_id: str) -> bool:
    """Ask the worker running the job to pause it after its current step (it checkpoints, then moves it by
    `paused`); False if the job is not running or was asked already. Its event says so."""
    asked = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.running, Job.pause_requested_at.is_(None))
        .values(pause_requested_at=db_now())
    ).rowcount  # type: ignore[attr-defined]
    if asked == 1:
        append_event(session, job_id, "log", "pause requested: the job pauses once its current step is checkpointed")
    return bool(asked == 1)


# --- claiming -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClaimedJob:
    """What a worker needs of the job it claimed, read once at the claim."""

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
    devices: int = 1  # its ranks, one per device (`resources.devices`)


def claim(session: Session, job_id: str, *, heartbeat_timeout: float, max_attempts: int) -> ClaimedJob | None:
    """queued -> running with attempt + 1, for exactly one worker; also a running job whose heartbeat is older
    than `heartbeat_timeout` (its worker died) if it may lose one more worker (`max_attempts`). None if the job
    cannot be taken (finished, cancelled, or running on a live worker), so a task delivered twice is harmless."""
    before = session.execute(select(Job.status, Job.attempt).where(Job.id == job_id)).one_or_none()
    if before is None:
        return None
    stale = and_(Job.heartbeat_at < db_now(-heartbeat_timeout), Job.lost_workers + 1 < max_attempts)
    message = "training started"
    if before.status == JobStatus.running:
        message = "training started again: the worker that ran the job stopped answering"
    elif before.attempt > 0:
        message = "training started again"
    claimed = transition(
        session,
        job_id,
        "claim",
        message=message,
        data={"attempt": before.attempt + 1},
        where=(Job.attempt == before.attempt, or_(Job.status == JobStatus.queued, stale)),
        values={
            "attempt": Job.attempt + 1,
            "lost_workers": Job.lost_workers + case((Job.status == JobStatus.running, 1), else_=0),
            "started_at": db_now(),
            "heartbeat_at": db_now(),
        },
    )
    if not claimed:
        return None
    job = session.scalars(select(Job).where(Job.id == job_id)).one()
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
        devices=job.devices,
    )


def beat(session: Session, job_id: str, attempt: int) -> None:
    """The running job's heartbeat (the database's clock), written only while this attempt runs it."""
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.attempt == attempt, Job.status == JobStatus.running)
        .values(heartbeat_at=db_now())
    )


def has_ended(session: Session, job_id: str, attempt: int) -> bool:
    """Whether the job reached a final state on this attempt (so nothing will resume it)."""
    row = session.execute(select(Job.status, Job.attempt).where(Job.id == job_id)).one_or_none()
    if row is None:  # deleted by its user once it had ended
        return True
    return bool(row.attempt == attempt and row.status in TERMINAL_STATUSES)


# --- queues -------------------------------------------------------------------------------------------------
def job_queue(settings: Settings, method: str, devices: int = 1) -> str:
    """The queue a job's task goes to: the CUDA workers' for a method that needs CUDA (qlora), else the
    default one; a job on several devices, that queue's for its number of devices (`<queue>-devices-4`), which
    only workers that own as many consume."""
    needs_cuda = method in METHODS and METHODS[method].needs_cuda
    queue = cuda_queue(settings.queue_name) if needs_cuda else settings.queue_name
    return queue if devices <= 1 else f"{queue}-devices-{devices}"


def worker_queues(settings: Settings, *, trains_on_cuda: bool, devices: int = 1) -> list[str]:
    """The queues a worker consumes: the default one, and the CUDA one if it trains on CUDA; with several devices,
    also theirs for every number of devices up to its own."""
    queues = [settings.queue_name, *([cuda_queue(settings.queue_name)] if trains_on_cuda else [])]
    return [*queues, *(f"{queue}-devices-{n}" for n in range(2, devices + 1) for queue in queues)]


def enqueue(settings: Settings, job_id: str, method: str, devices: int) -> None:
    """Send the job's task to its queue, by name with only the job id (after the job row is committed)."""
    send_training_task(settings, job_id, queue=job_queue(settings, method, devices))
