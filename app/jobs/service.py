"""Jobs: create one from a checked plan (planning.py) and queue it, read and cancel them, their events, metrics and
checkpoints. Every change of a job's status goes through the state machine (state.py)."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core import idempotency
from app.core.errors import Conflict, ErrorCode, NotFound, ServiceUnavailable, TooManyRequests, clip
from app.core.ids import new_id
from app.core.models import ACTIVE_STATUSES, TERMINAL_STATUSES, Checkpoint, Job, JobEvent, JobStatus
from app.core.pagination import cursor_row
from app.core.settings import Settings
from app.core.storage import ObjectStorage, delete_after_commit
from app.core.usage import check_storage, lock_tenant
from app.jobs import repository, state, workers
from app.jobs.planning import JobPlan, JobSpec, cuda_training, plan_job, planned_outside
from app.ml.models import ModelStore

log = logging.getLogger(__name__)


def create_job(
    session: Session,
    *,
    tenant_id: str,
    request: JobSpec,
    plan: JobPlan,
    max_active_jobs: int,
    max_stored_bytes: int,
) -> Job:
    """A queued job for the checked request (sent to the broker by `dispatch_job` once committed)."""
    _check_active_jobs(session, tenant_id=tenant_id, limit=max_active_jobs)
    # The job will store checkpoints and an adapter: room for the most it will keep is reserved until it ends.
    reserved = plan.footprint.stored_bytes
    check_storage(
        session,
        tenant_id=tenant_id,
        adding=reserved,
        limit=max_stored_bytes,
        what=f"a new job, which reserves the {reserved:,} bytes it may store (checkpoints and its adapter),",
        lock=False,
    )
    base_model, record = plan.base_model, plan.record
    job = Job(
        id=new_id("ftjob"),
        tenant_id=tenant_id,
        base_model=base_model,
        base_model_revision=record.revision,
        method=plan.method,
        training_file_id=request.training_file,
        validation_file_id=request.validation_file,
        suffix=request.suffix,
        hyperparameters=plan.stored_hyperparameters(),
        user_metadata=request.metadata,
        reserved_bytes=reserved,
        devices=request.devices,
    )
    state.create(session, job)
    # Files were validated line by line at upload; what remains is that they still exist (checked above).
    state.transition(session, job.id, "files_validated", message="files validated; job queued")
    session.refresh(job)
    return job


def submit_job(
    session: Session,
    *,
    settings: Settings,
    storage: ObjectStorage,
    models: ModelStore,
    tenant_id: str,
    spec: JobSpec,
    idempotency_key: str | None = None,
    endpoint: str = "jobs",
) -> Job:
    """Check, create, commit and queue a job: what `POST /jobs` and `POST /v1/fine_tuning/jobs` do.

    With an idempotency key, a retry of the same request returns the job the first one created (never a
    second job); the same key with another request is a conflict. No database connection is held while a file's
    tokens are counted or the job's storage estimated (`planned_outside`)."""

    def attempt() -> Job:
        return _submit_job(
            session,
            settings=settings,
            storage=storage,
            tenant_id=tenant_id,
            spec=spec,
            idempotency_key=idempotency_key,
            endpoint=endpoint,
        )

    return planned_outside(session, storage=storage, models=models, attempt=attempt)


def _submit_job(
    session: Session,
    *,
    settings: Settings,
    storage: ObjectStorage,
    tenant_id: str,
    spec: JobSpec,
    idempotency_key: str | None,
    endpoint: str,
) -> Job:
    request_sha256 = idempotency.digest(_spec_json(spec)) if idempotency_key else None
    if idempotency_key:
        seen = idempotency.find(session, tenant_id=tenant_id, endpoint=endpoint, key=idempotency_key)
        if seen is not None:
            idempotency.check_same_request(seen, request_sha256)
            return get_job(session, tenant_id=tenant_id, job_id=seen.resource_id)
    plan = plan_job(
        session,
        tenant_id=tenant_id,
        request=spec,
        default_base_model=settings.default_base_model,
        max_batch_tokens=settings.train_max_batch_tokens,
        cuda_training=cuda_training(settings),
    )
    job = create_job(
        session,
        tenant_id=tenant_id,
        request=spec,
        plan=plan,
        max_active_jobs=settings.max_active_jobs_per_tenant,
        max_stored_bytes=settings.max_stored_bytes_per_tenant,
    )
    if idempotency_key:
        idempotency.remember(
            session,
            tenant_id=tenant_id,
            endpoint=endpoint,
            key=idempotency_key,
            resource_id=job.id,
            request_sha256=request_sha256,
        )
    # Committed before the task is sent (the worker re-reads the row), unless the same key won a race.
    winner = idempotency.commit_or_winner(session, tenant_id=tenant_id, endpoint=endpoint, key=idempotency_key)
    if winner is not None:
        return get_job(session, tenant_id=tenant_id, job_id=winner)
    dispatch_job(session, settings=settings, storage=storage, job=job)
    if workers.tell_if_waiting(session, settings, job):
        session.commit()
    return job


def _spec_json(spec: JobSpec) -> str:
    return json.dumps(dataclasses.asdict(spec), sort_keys=True, separators=(",", ":"))


# How long a client told "too many jobs" waits before it tries again.
ACTIVE_JOBS_RETRY_AFTER = 30


def _check_active_jobs(session: Session, *, tenant_id: str, limit: int) -> None:
    """Refuse a job past the tenant's limit of jobs queued or running. The tenant's row is locked (PostgreSQL)
    until the job is committed, so two concurrent requests cannot both take the last place."""
    lock_tenant(session, tenant_id)
    active = session.scalar(
        select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id, Job.status.in_(ACTIVE_STATUSES))
    )
    if active is not None and active >= limit:
        raise TooManyRequests(
            f"this tenant has {active} jobs queued or running, its limit; wait for one to end or cancel one",
            code=ErrorCode.too_many_jobs,
            retry_after=ACTIVE_JOBS_RETRY_AFTER,
        )


def dispatch_job(session: Session, *, settings: Settings, storage: ObjectStorage, job: Job) -> None:
    """Send the committed job to the broker; if the broker is unreachable the job fails visibly."""
    try:
        state.enqueue(settings, job.id, job.method, job.devices)
    except Exception as exc:
        log.exception("could not enqueue %s", job.id)
        message = "the job queue was unreachable when the job was created; create the job again later"
        state.transition(
            session,
            job.id,
            "dispatch_failed",
            message=message,
            values={"error": message, "error_code": ErrorCode.queue_unavailable},
            level="error",
            storage=storage,
        )
        session.commit()
        session.refresh(job)
        raise ServiceUnavailable(
            "the job queue is unreachable; the job was marked failed, try again later",
            code=ErrorCode.queue_unavailable,
        ) from exc


def get_job(session: Session, *, tenant_id: str, job_id: str, for_update: bool = False) -> Job:
    job = repository.get_job(session, tenant_id=tenant_id, job_id=job_id, for_update=for_update)
    if job is None:
        raise NotFound(f"no job with id {clip(job_id)}", param="job_id")
    return job


def list_jobs(session: Session, *, tenant_id: str, limit: int, after: str | None) -> tuple[list[Job], bool]:
    cursor = cursor_row(after, lambda job_id: repository.get_job(session, tenant_id=tenant_id, job_id=job_id))
    return repository.list_jobs(session, tenant_id=tenant_id, limit=limit, after=cursor)


def cancel_job(session: Session, *, storage: ObjectStorage, tenant_id: str, job_id: str) -> Job:
    """queued or running -> cancelled (a running job's worker stops at its next step); its checkpoints keep their
    artifacts and lose their training states: nothing will resume it."""
    job = get_job(session, tenant_id=tenant_id, job_id=job_id)
    # Atomic: a worker finishing at the same moment either wins (and we report a conflict) or sees
    # `cancelled` at its next step and stops without publishing.
    cancelled = state.transition(session, job.id, "cancel", message="job cancelled by the user", storage=storage)
    session.refresh(job)
    if not cancelled:
        raise Conflict(
            f"job {job.id} is already {job.status.value}", param="job_id", code=ErrorCode.job_not_cancellable
        )
    return job


def pause_job(session: Session, *, tenant_id: str, job_id: str) -> Job:
    """Pause the job: a queued one at once; a running one by its worker, which checkpoints after its current step
    and frees itself (the job says `running` until then). Asking again is harmless; a job that has ended (or is
    still validating its files) is a 409 `job_not_pausable`. `resume_job` continues it from that checkpoint."""
    job = get_job(session, tenant_id=tenant_id, job_id=job_id)
    if not state.transition(session, job.id, "pause", message="job paused by the user"):
        state.request_pause(session, job.id)
    session.refresh(job)
    if job.status not in (JobStatus.paused, JobStatus.running):
        raise Conflict(
            f"job {job.id} is {job.status.value}: only a queued or running job can be paused",
            param="job_id",
            code=ErrorCode.job_not_pausable,
        )
    return job


def resume_job(session: Session, *, settings: Settings, tenant_id: str, job_id: str) -> Job:
    """paused -> queued, its task sent once that is committed: a worker continues it from the checkpoint it paused
    at (nothing is trained twice). A job that is not paused is a 409 `job_not_paused`."""
    job = get_job(session, tenant_id=tenant_id, job_id=job_id)
    resumed = state.transition(
        session, job.id, "resume", message="job resumed by the user", values={"pause_requested_at": None}
    )
    session.refresh(job)
    if not resumed:
        raise Conflict(
            f"job {job.id} is {job.status.value}: only a paused job can be resumed",
            param="job_id",
            code=ErrorCode.job_not_paused,
        )
    session.commit()
    try:
        state.enqueue(settings, job.id, job.method, job.devices)
    except Exception:  # queued, with queued_at set: the reaper sends its task again
        log.exception("could not enqueue resumed job %s; the reaper will", job.id)
    return job


def delete_job(session: Session, *, storage: ObjectStorage, tenant_id: str, job_id: str) -> Job:
    """Delete a job that has ended, with everything it produced: its events, its checkpoints and its adapter
    (rows now, objects once that is committed). The adapter goes with it: it is served with its job's
    hyperparameters, and the job is what a user deletes to free all of it (to keep the adapter, delete the
    checkpoints instead). Its files stay (deleted on their own). 409 `job_not_ended` while it is validating,
    queued or running: cancel it first."""
    job = get_job(session, tenant_id=tenant_id, job_id=job_id, for_update=True)
    if job.status not in TERMINAL_STATUSES:
        raise Conflict(
            f"job {job.id} is {job.status.value}: only a job that has ended can be deleted; cancel it first",
            param="job_id",
            code=ErrorCode.job_not_ended,
        )
    checkpoints, adapters = repository.delete_job(session, job_id=job.id)
    keys = [key for row in checkpoints for key in (row.storage_key, row.state_key)]
    keys += [row.storage_key for row in adapters]
    delete_after_commit(session, storage, keys, what=f"job {job.id}")
    return job


def delete_checkpoint(
    session: Session, *, storage: ObjectStorage, tenant_id: str, job_id: str, checkpoint_id: str
) -> Checkpoint:
    """Delete one of the job's checkpoints (rows now, its artifact and training state once that is committed),
    whatever the job's state: a running job that is interrupted resumes from an earlier one, or starts over."""
    job = get_job(session, tenant_id=tenant_id, job_id=job_id, for_update=True)  # as a worker recording one
    deleted = repository.delete_checkpoints(session, job_id=job.id, checkpoint_id=checkpoint_id)
    if not deleted:
        raise NotFound(f"job {job.id} has no checkpoint with id {clip(checkpoint_id)}", param="checkpoint_id")
    row = deleted[0]
    delete_after_commit(session, storage, [row.storage_key, row.state_key], what=f"checkpoint {row.id}")
    return row


METRIC_EVENT_TYPES = ("metrics", "eval")
CURVES = (
    "train_loss",
    "train_token_accuracy",
    "learning_rate",
    "tokens_per_second",
    "valid_loss",
    "valid_perplexity",
    "valid_token_accuracy",
    # DPO jobs' (TRL's rewards/chosen, … under the job's names)
    *(
        f"{split}_rewards_{name}"
        for split in ("train", "valid")
        for name in ("chosen", "rejected", "margins", "accuracies")
    ),
)


def list_checkpoints(session: Session, *, tenant_id: str, job_id: str) -> list[Checkpoint]:
    job = get_job(session, tenant_id=tenant_id, job_id=job_id)
    return repository.list_checkpoints(session, job_id=job.id)


def metric_curves(session: Session, *, job_id: str, max_points: int) -> dict[str, list[tuple[int, float]]]:
    """Each metric's (step, value) pairs from the job's events, thinned evenly to `max_points` (the first and last
    kept) by the database: however long the job, at most `max_points` events of each type are read."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for type_ in METRIC_EVENT_TYPES:  # each curve comes from one type of event (step metrics, evaluations)
        _add_points(curves, repository.event_data(session, job_id=job_id, type_=type_, max_rows=max_points))
    return {name: _thin(points, max_points) for name, points in curves.items()}


def _add_points(curves: dict[str, list[tuple[int, float]]], rows: list[dict[str, Any]]) -> None:
    for data in rows:
        step = data.get("step")
        if not isinstance(step, int):
            continue
        for name in CURVES:
            value = data.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                curves.setdefault(name, []).append((step, float(value)))


def _thin(points: list[tuple[int, float]], max_points: int) -> list[tuple[int, float]]:
    if len(points) <= max_points:
        return points
    last = len(points) - 1
    return [points[round(i * last / (max_points - 1))] for i in range(max_points)]


def list_events(
    session: Session, *, tenant_id: str, job_id: str, after_seq: int, limit: int
) -> tuple[list[JobEvent], bool]:
    job = get_job(session, tenant_id=tenant_id, job_id=job_id)
    rows = repository.list_events(session, job_id=job.id, after_seq=after_seq, limit=limit + 1)
    return rows[:limit], len(rows) > limit


def list_events_newest_first(
    session: Session, *, tenant_id: str, job_id: str, after_seq: int | None, limit: int
) -> tuple[list[JobEvent], bool]:
    """OpenAI's order: the latest event first; a page continues with the events before `after_seq`."""
    job = get_job(session, tenant_id=tenant_id, job_id=job_id)
    rows = repository.list_events_newest_first(session, job_id=job.id, before_seq=after_seq, limit=limit + 1)
    return rows[:limit], len(rows) > limit
