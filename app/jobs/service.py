"""Job logic: check the request against files, models and methods; state changes go to the event log."""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core import idempotency
from app.core.errors import Conflict, ErrorCode, InvalidInput, NotFound, ServiceUnavailable, TooManyRequests, clip
from app.core.ids import new_id
from app.core.models import Checkpoint, File, FileTokenCount, Job, JobEvent, JobStatus, Tenant
from app.core.pagination import cursor_row
from app.core.settings import Settings
from app.core.storage import ObjectStorage
from app.core.usage import check_storage
from app.files import repository as files_repository
from app.files.service import token_counts
from app.jobs import repository, state
from app.ml.device import cuda_training_available
from app.ml.hyperparameters import HyperparameterError, TrainingHyperparameters
from app.ml.methods import METHODS
from app.ml.models import ModelRecord, ModelStore
from app.models.service import require_model

log = logging.getLogger(__name__)


def validate_hyperparameters(method: str, values: dict[str, Any], base_model: ModelRecord) -> dict[str, Any]:
    """The method's hyperparameters, checked (also against the base model) and with every default filled in."""
    return checked_hyperparameters(method, values, base_model).model_dump(mode="json")


def checked_hyperparameters(method: str, values: dict[str, Any], base_model: ModelRecord) -> TrainingHyperparameters:
    """`validate_hyperparameters`, as the method's hyperparameter object."""
    model = METHODS[method].hyperparameters
    try:
        return model.model_validate(values).for_model(base_model)
    except HyperparameterError as exc:
        param = f"hyperparameters.{exc.field}"
        raise InvalidInput(f"{param}: {exc}", param=param) from None
    except ValidationError as exc:
        first = exc.errors()[0]
        # The field and list index, without pydantic's union-branch tags such as "list[constrained-str]".
        field = ".".join(str(p)[:64] for p in first["loc"] if isinstance(p, int) or p in model.model_fields)
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            field = str(first["loc"][0])[:64]
            allowed = ", ".join(model.model_fields)
            message = f"unknown hyperparameter for method {method!r}; allowed: {allowed}"
        param = f"hyperparameters.{field}" if field else "hyperparameters"
        raise InvalidInput(f"{param}: {message}", param=param) from exc


@dataclass(frozen=True)
class JobSpec:
    """What a user asks to train, whichever API they ask through (native `/jobs` or OpenAI's
    `/v1/fine_tuning/jobs`): the domain arguments of `plan_job`, `create_job` and `submit_job`."""

    base_model: str | None  # None: the deployment's default
    method: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] | None = None


@dataclass
class JobPlan:
    """A job request checked against its model, method and files: what `POST /jobs` creates, or a dry run shows."""

    base_model: str
    method: str
    record: ModelRecord
    hyperparameters: TrainingHyperparameters
    files: dict[str, tuple[File, FileTokenCount]]  # training_file / validation_file -> the row and its counts


def plan_job(
    session: Session,
    *,
    storage: ObjectStorage,
    models: ModelStore,
    tenant_id: str,
    request: JobSpec,
    default_base_model: str,
    max_batch_tokens: int,
    cuda_training: bool,
) -> JobPlan:
    """Every check of a job request, short of creating it. `cuda_training`: whether this service's workers train
    on CUDA (methods that need it are refused without)."""
    base_model = request.base_model or default_base_model
    # Locked (PostgreSQL, shared) until the job is committed: `tuneforge models remove` waits, then sees the job.
    record = require_model(session, model_id=base_model, lock=True)
    if request.method not in METHODS:
        raise InvalidInput(
            f"unknown method {clip(request.method)}; available: {', '.join(METHODS)}",
            param="method",
        )
    if METHODS[request.method].needs_cuda and not cuda_training:
        raise InvalidInput(
            f"method {request.method} needs a CUDA GPU (and the bitsandbytes package), and this service trains "
            "without one; use method lora, which trains the same adapters on the unquantized model",
            param="method",
            code=ErrorCode.method_unavailable,
        )
    hyperparameters = checked_hyperparameters(request.method, request.hyperparameters, record)
    if hyperparameters.early_stopping_patience and not (request.validation_file or hyperparameters.validation_split):
        raise InvalidInput(
            "hyperparameters.early_stopping_patience: early stopping needs a validation_file or a validation_split",
            param="hyperparameters.early_stopping_patience",
        )
    files: dict[str, tuple[File, FileTokenCount]] = {}
    for param, file_id in (("training_file", request.training_file), ("validation_file", request.validation_file)):
        if file_id is None:
            continue
        # Locked (PostgreSQL) until the job is committed, so a concurrent delete waits and then sees the job.
        file = files_repository.get_file(session, tenant_id=tenant_id, file_id=file_id, for_update=True)
        if file is None:
            raise InvalidInput(f"{param}: no file with id {clip(file_id)}", param=param, code=ErrorCode.file_not_found)
        if file.purpose != "fine-tune":
            raise InvalidInput(f"{param}: file {file.id} is not a fine-tune file", param=param)
        if file.format == "chat" and not record.chat_template:
            raise InvalidInput(
                f"{param}: file {file.id} holds conversations but {record.id} has no chat template; use a chat "
                "model, or prompt/completion data",
                param=param,
                code=ErrorCode.no_chat_template,
            )
        # Counted with this model's tokenizer (at upload, or now: then kept for the next job on it).
        counts = token_counts(session, storage=storage, models=models, file=file, model=record, param=param)
        _check_fits_token_budget(
            file.id,
            counts.max_example_tokens,
            param,
            hyperparameters.max_seq_length,
            max_batch_tokens,
            virtual_tokens=hyperparameters.reserved_positions(),
        )
        files[param] = (file, counts)
    return JobPlan(
        base_model=base_model, method=request.method, record=record, hyperparameters=hyperparameters, files=files
    )


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
    # The job will store an adapter and checkpoints: not for a tenant already at its storage limit.
    check_storage(session, tenant_id=tenant_id, adding=1, limit=max_stored_bytes, what="a new job", lock=False)
    base_model, record = plan.base_model, plan.record
    job = Job(
        id=new_id("ftjob"),
        tenant_id=tenant_id,
        base_model=base_model,
        base_model_revision=record.revision,
        method=request.method,
        training_file_id=request.training_file,
        validation_file_id=request.validation_file,
        suffix=request.suffix,
        hyperparameters=plan.hyperparameters.model_dump(mode="json"),
        user_metadata=request.metadata,
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
    second job); the same key with another request is a conflict."""
    request_sha256 = idempotency.digest(_spec_json(spec)) if idempotency_key else None
    if idempotency_key:
        seen = idempotency.find(session, tenant_id=tenant_id, endpoint=endpoint, key=idempotency_key)
        if seen is not None:
            idempotency.check_same_request(seen, request_sha256)
            return get_job(session, tenant_id=tenant_id, job_id=seen.resource_id)
    plan = plan_job(
        session,
        storage=storage,
        models=models,
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
    return job


def _spec_json(spec: JobSpec) -> str:
    return json.dumps(dataclasses.asdict(spec), sort_keys=True, separators=(",", ":"))


def cuda_training(settings: Settings) -> bool:
    """Whether this service's workers train on CUDA: as configured, or as this process could."""
    return settings.cuda_workers if settings.cuda_workers is not None else cuda_training_available(settings.device)


PACE_SAMPLE = 20  # recent finished jobs whose training pace estimates a dry run's duration


def dry_run(session: Session, plan: JobPlan) -> dict[str, Any]:
    """What the job would do: examples, steps and tokens, and how long it would train at the pace of this
    deployment's recent jobs of the same method on the same model (None before there is one)."""
    hp = plan.hyperparameters
    train_file, train_counts = plan.files["training_file"]
    n_examples = train_file.n_examples
    held_out = hp.held_out(n_examples) if "validation_file" not in plan.files else 0
    n_train = max(0, n_examples - held_out)
    steps_per_epoch = hp.steps_per_epoch(n_train)
    # At most max_seq_length tokens an example; a file's count is of whole examples, so this is an upper bound.
    train_tokens = min(train_counts.n_tokens * n_train // max(n_examples, 1), n_train * hp.max_seq_length)
    tokens = train_tokens * hp.n_epochs
    paces = [
        float(metrics["tokens_per_second"])
        for metrics in session.scalars(
            select(Job.metrics)
            .where(Job.base_model == plan.base_model, Job.status == JobStatus.succeeded)
            .where(Job.method == plan.method)
            .order_by(Job.finished_at.desc())
            .limit(PACE_SAMPLE)
        )
        if isinstance(metrics.get("tokens_per_second"), int | float) and metrics["tokens_per_second"] > 0
    ]
    pace = statistics.median(paces) if paces else None
    return {
        "object": "fine_tuning.job.dry_run",
        "base_model": plan.base_model,
        "hyperparameters": hp.model_dump(mode="json"),
        "train_examples": n_train,
        "held_out_examples": held_out,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": steps_per_epoch * hp.n_epochs,
        "train_tokens_per_epoch": train_tokens,
        "estimated_tokens_per_second": round(pace, 1) if pace else None,
        "estimated_duration_seconds": round(tokens / pace) if pace else None,
        "estimate_basis": f"the median pace of the last {len(paces)} finished {plan.method} job(s) on "
        f"{plan.base_model} here"
        if paces
        else f"none yet: no {plan.method} job on {plan.base_model} has finished here",
    }


# How long a client told "too many jobs" waits before it tries again.
ACTIVE_JOBS_RETRY_AFTER = 30


def _check_active_jobs(session: Session, *, tenant_id: str, limit: int) -> None:
    """Refuse a job past the tenant's limit of jobs queued or running. The tenant's row is locked (PostgreSQL)
    until the job is committed, so two concurrent requests cannot both take the last place."""
    session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())
    active = session.scalar(
        select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id, Job.status.in_(state.ACTIVE_STATUSES))
    )
    if active is not None and active >= limit:
        raise TooManyRequests(
            f"this tenant has {active} jobs queued or running, its limit; wait for one to end or cancel one",
            code=ErrorCode.too_many_jobs,
            retry_after=ACTIVE_JOBS_RETRY_AFTER,
        )


def _check_fits_token_budget(
    file_id: str,
    max_example_tokens: int,
    param: str,
    max_seq_length: int,
    max_batch_tokens: int,
    *,
    virtual_tokens: int = 0,
) -> None:
    """Refuse a job whose longest example (cut to max_seq_length), with the method's virtual tokens, cannot fit
    one training micro-batch."""
    longest = min(max_seq_length, max_example_tokens or max_seq_length)
    if longest + virtual_tokens <= max_batch_tokens:
        return
    with_virtual = f", which with the {virtual_tokens} virtual tokens is" if virtual_tokens else ","
    raise InvalidInput(
        f"hyperparameters.max_seq_length: {param} {file_id} has an example of {longest} tokens (after "
        f"max_seq_length={max_seq_length}){with_virtual} more than the {max_batch_tokens} tokens a training "
        f"micro-batch may hold on this service; lower max_seq_length to at most {max_batch_tokens - virtual_tokens} "
        f"(longer examples are cut) or {'num_virtual_tokens' if virtual_tokens else 'shorten the examples'}",
        param="hyperparameters.max_seq_length",
        code=ErrorCode.example_too_long,
    )


def dispatch_job(session: Session, *, settings: Settings, storage: ObjectStorage, job: Job) -> None:
    """Send the committed job to the broker; if the broker is unreachable the job fails visibly."""
    try:
        state.enqueue(settings, job.id, job.method)
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


def get_job(session: Session, *, tenant_id: str, job_id: str) -> Job:
    job = repository.get_job(session, tenant_id=tenant_id, job_id=job_id)
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


METRIC_EVENT_TYPES = ("metrics", "eval")
CURVES = (
    "train_loss",
    "train_token_accuracy",
    "learning_rate",
    "tokens_per_second",
    "valid_loss",
    "valid_perplexity",
    "valid_token_accuracy",
)


def list_checkpoints(session: Session, *, tenant_id: str, job_id: str) -> list[Checkpoint]:
    job = get_job(session, tenant_id=tenant_id, job_id=job_id)
    return repository.list_checkpoints(session, job_id=job.id)


def metric_curves(session: Session, *, job_id: str, max_points: int) -> dict[str, list[tuple[int, float]]]:
    """Each metric's (step, value) pairs from the job's events, thinned evenly to `max_points` (the last kept)."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for data in repository.event_data(session, job_id=job_id, types=METRIC_EVENT_TYPES):
        step = data.get("step")
        if not isinstance(step, int):
            continue
        for name in CURVES:
            value = data.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                curves.setdefault(name, []).append((step, float(value)))
    return {name: _thin(points, max_points) for name, points in curves.items()}


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
