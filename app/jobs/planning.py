"""Planning a job: a request checked against its base model, method, hyperparameters and files, before anything is
created; and what a dry run shows of the plan."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.errors import ErrorCode, InvalidInput, clip
from app.core.models import File, FileTokenCount, Job, JobStatus
from app.core.settings import Settings
from app.core.storage import ObjectStorage
from app.files import repository as files_repository
from app.files.service import count_outside, token_counts
from app.jobs import starting
from app.jobs.starting import StartingPoint
from app.ml import footprint
from app.ml.device import cuda_training_available
from app.ml.footprint import Footprint
from app.ml.hyperparameters import HyperparameterError, TrainingHyperparameters
from app.ml.methods import METHODS
from app.ml.models import ModelRecord, ModelStore, ModelUnavailable
from app.ml.objectives import FILE_FORMATS, OBJECTIVES, SFT, hyperparameters_class
from app.models.service import model_unavailable, require_model

T = TypeVar("T")


DEFAULT_METHOD = "lora"


def checked_hyperparameters(
    method: str, values: dict[str, Any], base_model: ModelRecord, objective: str = SFT
) -> TrainingHyperparameters:
    """The method's hyperparameters (and the objective's: DPO's beta), checked (also against the base model) and
    with every default filled in; a 422 naming the field otherwise."""
    model = hyperparameters_class(method, objective)
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

    base_model: str | None  # None: the deployment's default; an adapter or checkpoint: continue from it
    method: str | None  # None: lora, or the method of the fine-tuned model it continues from
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] | None = None
    objective: str = SFT
    # OpenAI's: the learning rate as a multiple of the method's default (known once the method is)
    learning_rate_multiplier: float | None = None
    devices: int = 1  # `resources.devices`: how many devices it trains on, one rank each


@dataclass
class JobPlan:
    """A job request checked against its model, method and files: what `POST /jobs` creates, or a dry run shows."""

    base_model: str
    method: str
    record: ModelRecord
    hyperparameters: TrainingHyperparameters
    files: dict[str, tuple[File, FileTokenCount]]  # training_file / validation_file -> the row and its counts
    footprint: Footprint  # what the job will store at most: reserved against the tenant's storage quota
    start: StartingPoint | None = None  # the fine-tuned model it continues from

    def stored_hyperparameters(self) -> dict[str, Any]:
        """What the job stores (and shows) as its hyperparameters."""
        return starting.stored(self.hyperparameters.model_dump(mode="json"), self.start)


class NotSized(Exception):
    """What a job will store is not estimated yet in this process for its model, method and hyperparameters: the
    estimate builds the model on the meta device (a second or more), so it is made with no database connection
    held (`planned_outside`)."""

    def __init__(self, record: ModelRecord, method: str, hyperparameters: TrainingHyperparameters) -> None:
        super().__init__(f"{method} on {record.id} not sized")
        self.record, self.method, self.hyperparameters = record, method, hyperparameters

    def estimate(self, models: ModelStore) -> None:
        try:
            footprint.estimate(models, self.record, self.method, self.hyperparameters)
        except ModelUnavailable as exc:
            raise model_unavailable(self.record.id, exc) from None


def planned_outside(session: Session, *, storage: ObjectStorage, models: ModelStore, attempt: Callable[[], T]) -> T:
    """`attempt()`, which plans a job (`plan_job`). The slow work planning needs is done with no database
    connection held, each time the session rolled back and `attempt()` run again: a file's tokens counted with
    the model's tokenizer (`count_outside`), the job's storage estimated (`NotSized`). Once done, both are kept
    for the next job like it, which plans in one go."""

    def sized() -> T:
        while True:
            try:
                return attempt()
            except NotSized as missing:
                session.rollback()
                missing.estimate(models)

    return count_outside(session, storage=storage, models=models, attempt=sized)


def plan_job(
    session: Session,
    *,
    tenant_id: str,
    request: JobSpec,
    default_base_model: str,
    max_batch_tokens: int,
    cuda_training: bool,
) -> JobPlan:
    """Every check of a job request, short of creating it. `cuda_training`: whether this service's workers train
    on CUDA (methods that need it are refused without). A file whose tokens are not counted yet with the
    model's tokenizer raises TokensNotCounted, and a job not sized yet NotSized: run it under `planned_outside`."""
    start = (
        starting.starting_point(session, tenant_id=tenant_id, model=request.base_model)
        if request.base_model is not None
        else None
    )
    base_model = start.base_model if start is not None else request.base_model or default_base_model
    # Locked (PostgreSQL, shared) until the job is committed: `tuneforge models remove` waits, then sees the job.
    record = require_model(session, model_id=base_model, lock=True)
    method = request.method or (start.method if start is not None else DEFAULT_METHOD)
    if method not in METHODS:
        raise InvalidInput(f"unknown method {clip(method)}; available: {', '.join(METHODS)}", param="method")
    if METHODS[method].needs_cuda and not cuda_training:
        raise InvalidInput(
            f"method {method} needs a CUDA GPU (and the bitsandbytes package), and this service trains "
            "without one; use method lora, which trains the same adapters on the unquantized model",
            param="method",
            code=ErrorCode.method_unavailable,
        )
    if request.objective not in OBJECTIVES:
        raise InvalidInput(
            f"unknown objective {clip(request.objective)}; available: {', '.join(OBJECTIVES)}", param="objective"
        )
    if request.devices > 1 and request.objective != SFT:
        raise InvalidInput(
            f"resources.devices: objective {request.objective} trains on one device; ask for 1 device or none",
            param="resources.devices",
        )
    values = dict(request.hyperparameters)
    if start is not None:
        _check_continuable(start, record, method)
        values = starting.with_inherited(start, values)
    if request.learning_rate_multiplier is not None:
        default_rate = METHODS[method].hyperparameters.model_fields["learning_rate"].default
        values["learning_rate"] = request.learning_rate_multiplier * float(default_rate)
    hyperparameters = checked_hyperparameters(method, values, record, request.objective)
    if start is not None:
        starting.check_same_shape(start, hyperparameters.model_dump(mode="json"))
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
        if file.format not in FILE_FORMATS[request.objective]:
            raise InvalidInput(
                f"{param}: file {file.id} holds {file.format} examples; objective {request.objective} trains on "
                f"{' or '.join(FILE_FORMATS[request.objective])} examples"
                + (' (preference lines need "objective": "dpo")' if file.format == "preference" else ""),
                param=param,
                code=ErrorCode.file_format_mismatch,
            )
        if file.format in ("chat", "preference") and not record.chat_template:
            raise InvalidInput(
                f"{param}: file {file.id} holds conversations but {record.id} has no chat template; use a chat "
                "model, or prompt/completion data",
                param=param,
                code=ErrorCode.no_chat_template,
            )
        if file.has_tools and record.tool_call_format is None:
            raise InvalidInput(
                f"{param}: file {file.id} uses tool calling but the chat template of {record.id} has no tool "
                "support; use a base model whose tool_call_format is not null (GET /v1/models/{id})",
                param=param,
                code=ErrorCode.no_tool_support,
            )
        # Counted with this model's tokenizer (at upload, or by count_outside: then kept for the next job on it).
        counts = token_counts(session, file=file, model=record, param=param)
        _check_fits_token_budget(
            file.id,
            counts.max_example_tokens,
            param,
            hyperparameters.max_seq_length,
            max_batch_tokens,
            virtual_tokens=hyperparameters.reserved_positions(),
        )
        files[param] = (file, counts)
    sized = footprint.cached(record, method, hyperparameters)
    if sized is None:
        raise NotSized(record, method, hyperparameters)
    return JobPlan(
        base_model=base_model,
        method=method,
        record=record,
        hyperparameters=hyperparameters,
        files=files,
        footprint=sized,
        start=start,
    )


def _check_continuable(start: StartingPoint, record: ModelRecord, method: str) -> None:
    if start.base_model_revision not in (None, record.revision):
        raise InvalidInput(
            f"base_model: {start.id} was trained on {record.id} before it was registered again with other files; "
            "it cannot be continued",
            param="base_model",
            code=ErrorCode.model_unavailable,
        )
    if method != start.method:
        raise InvalidInput(
            f"method: {start.id} was trained with method {start.method}; a job that continues from it trains the "
            f"same method (leave method out, or give {start.method})",
            param="method",
            code=ErrorCode.method_mismatch,
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


def cuda_training(settings: Settings) -> bool:
    """Whether this service's workers train on CUDA: as configured, or as this process could."""
    return settings.cuda_workers if settings.cuda_workers is not None else cuda_training_available(settings.device)


PACE_SAMPLE = 20  # recent finished jobs whose training pace estimates a dry run's duration


def dry_run(session: Session, plan: JobPlan, *, tenant_id: str) -> dict[str, Any]:
    """What the job would do: examples, steps and tokens, and how long it would train at the pace of the tenant's
    own recent jobs of the same method on the same model (None before there is one).

    Only the tenant's own jobs: a deployment-wide pace would tell one tenant when another's jobs of a method and
    model finished, and how fast they trained."""
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
            .where(Job.tenant_id == tenant_id, Job.base_model == plan.base_model, Job.method == plan.method)
            .where(Job.status == JobStatus.succeeded)
            .order_by(Job.finished_at.desc())
            .limit(PACE_SAMPLE)
        )
        if isinstance(metrics.get("tokens_per_second"), int | float) and metrics["tokens_per_second"] > 0
    ]
    pace = statistics.median(paces) if paces else None
    return {
        "object": "fine_tuning.job.dry_run",
        "base_model": plan.base_model,
        "hyperparameters": plan.stored_hyperparameters(),
        "train_examples": n_train,
        "held_out_examples": held_out,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": steps_per_epoch * hp.n_epochs,
        "train_tokens_per_epoch": train_tokens,
        "trainable_parameters": plan.footprint.trained_parameters,
        "estimated_stored_bytes": plan.footprint.stored_bytes,
        "estimated_tokens_per_second": round(pace, 1) if pace else None,
        "estimated_duration_seconds": round(tokens / pace) if pace else None,
        "estimate_basis": f"the median pace of your last {len(paces)} finished {plan.method} job(s) on "
        f"{plan.base_model}"
        if paces
        else f"none yet: none of your {plan.method} jobs on {plan.base_model} has finished",
    }
