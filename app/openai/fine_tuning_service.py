"""OpenAI's fine-tuning over Tuneforge's jobs: its requests as a `JobSpec`; jobs, events, checkpoints as its objects.

Nothing here decides anything a native `/jobs` request would not.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from app.core.errors import AppError, ErrorCode, InvalidInput, clip
from app.core.models import Checkpoint, Job, JobEvent
from app.core.schemas import unix_time
from app.jobs.planning import JobSpec
from app.jobs.schemas import estimated_finish
from app.ml.methods import METHODS
from app.ml.objectives import DPO, SFT, init_from, objective_of
from app.openai.fine_tuning_schemas import (
    DEFAULT_METHOD,
    OPENAI_METHOD_TYPES,
    FineTuningCheckpoint,
    FineTuningError,
    FineTuningEvent,
    FineTuningJob,
    FineTuningJobCreate,
)

EVENT_ID_PREFIX = "ftevent-"


def method_of(body: FineTuningJobCreate) -> tuple[str, str | None]:
    """(the `method.type` asked for, the Tuneforge method it names: None for OpenAI's supervised and dpo, which
    train the default method, or the method of the fine-tuned model the job continues from)."""
    asked = body.method.type if body.method is not None else "supervised"
    if asked in ("supervised", "dpo"):
        return asked, None
    if asked in OPENAI_METHOD_TYPES:
        raise InvalidInput(
            f"method.type: {asked} fine-tuning is not supported yet; use supervised or dpo ({DEFAULT_METHOD}) or "
            f"one of Tuneforge's methods: {', '.join(METHODS)}",
            param="method.type",
            code=ErrorCode.unsupported_method,
        )
    if asked not in METHODS:
        raise InvalidInput(
            f"method.type: unknown method {clip(asked)}; available: supervised, {', '.join(METHODS)}",
            param="method.type",
        )
    return asked, asked


def _default_learning_rate(method: str) -> float:
    return float(METHODS[method].hyperparameters.model_fields["learning_rate"].default)


def job_spec(body: FineTuningJobCreate) -> JobSpec:
    """The native job an OpenAI request asks for: `"auto"` is the default, `learning_rate_multiplier` times the
    method's default learning rate, top-level `seed` the hyperparameter `seed`."""
    asked, method = method_of(body)
    section = getattr(body.method, asked) if body.method is not None else None
    if body.method is not None:
        for name in body.method.model_fields_set - {"type", asked}:
            if getattr(body.method, name) is not None:
                raise InvalidInput(f"method.{name}: given with method.type {asked}", param=f"method.{name}")
    given: Any = section.hyperparameters if section is not None else None
    values: dict[str, Any] = given.model_dump(exclude_none=True) if isinstance(given, BaseModel) else dict(given or {})
    if body.hyperparameters is not None:
        if values:
            raise InvalidInput(
                f"hyperparameters: given twice; put them in method.{asked}.hyperparameters only",
                param="hyperparameters",
            )
        values = body.hyperparameters.model_dump(exclude_none=True)
    values = {name: value for name, value in values.items() if value != "auto"}
    multiplier = None
    if "learning_rate_multiplier" in values:
        multiplier = values.pop("learning_rate_multiplier")
        if "learning_rate" in values:
            raise InvalidInput(
                f"method.{asked}.hyperparameters: give learning_rate or learning_rate_multiplier, not both",
                param=f"method.{asked}.hyperparameters.learning_rate_multiplier",
            )
        if not isinstance(multiplier, int | float) or isinstance(multiplier, bool) or multiplier <= 0:
            raise InvalidInput(
                f'method.{asked}.hyperparameters.learning_rate_multiplier: must be a positive number or "auto"',
                param=f"method.{asked}.hyperparameters.learning_rate_multiplier",
            )
        multiplier = float(multiplier)  # times the method's default, once the method is known (planning)
    if body.seed is not None:
        if values.get("seed", body.seed) != body.seed:
            raise InvalidInput("seed: differs from the seed in the method's hyperparameters", param="seed")
        values["seed"] = body.seed
    return JobSpec(
        base_model=body.model,
        method=method,
        training_file=body.training_file,
        validation_file=body.validation_file,
        suffix=body.suffix,
        hyperparameters=values,
        metadata=body.metadata,
        objective=DPO if asked == "dpo" else SFT,
        learning_rate_multiplier=multiplier,
        devices=body.resources.devices if body.resources is not None else 1,
    )


def in_openai_terms(exc: AppError, body: FineTuningJobCreate) -> AppError:
    """A native error about a job request, naming the fields as the OpenAI request has them."""
    asked = body.method.type if body.method is not None else "supervised"
    renames = {"base_model": "model", "method": "method.type"}
    if exc.param and exc.param.startswith("hyperparameters") and body.hyperparameters is None:
        renames[exc.param] = f"method.{asked}.{exc.param}"
    if exc.param in renames:
        new = renames[exc.param]
        exc.message = exc.message.replace(f"{exc.param}:", f"{new}:", 1).replace(
            "unknown base_model ", "unknown model "
        )
        exc.param = new
    return exc


def job_object(job: Job) -> FineTuningJob:
    hp = dict(job.hyperparameters)
    multiplier = round(float(hp.get("learning_rate", 0.0)) / _default_learning_rate(job.method), 6)
    openai_hp = {
        "batch_size": hp.get("batch_size"),
        "learning_rate_multiplier": multiplier,
        "n_epochs": hp.get("n_epochs"),
    }
    everything = {name: value for name, value in hp.items() if name not in ("objective", "init_from")}
    method: dict[str, Any] = {"type": job.method, job.method: {"hyperparameters": {**everything, **openai_hp}}}
    if objective_of(hp) == DPO:  # OpenAI's type and its four, every hyperparameter beside them
        dpo = {**openai_hp, "beta": hp.get("beta")}
        method = {"type": "dpo", "dpo": {"hyperparameters": dpo}, job.method: method[job.method]}
    elif job.method == DEFAULT_METHOD:  # OpenAI's type, as its clients expect; every hyperparameter beside it
        method = {"type": "supervised", "supervised": {"hyperparameters": openai_hp}, job.method: method[job.method]}
    return FineTuningJob(
        id=job.id,
        created_at=unix_time(job.created_at) or 0,
        error=FineTuningError(code=job.error_code or "training_failed", message=job.error) if job.error else None,
        fine_tuned_model=job.adapter_id,
        finished_at=unix_time(job.finished_at),
        hyperparameters=openai_hp,
        method=method,
        model=init_from(hp) or job.base_model,  # a job that continues from a fine-tuned model names it, as OpenAI's
        organization_id=job.tenant_id,
        result_files=[],
        seed=int(hp.get("seed", 0)),
        status=job.status.value,
        trained_tokens=job.metrics.get("trained_tokens") if job.status.value == "succeeded" else None,
        training_file=job.training_file_id,
        validation_file=job.validation_file_id,
        estimated_finish=estimated_finish(job),
        metadata=job.user_metadata,
        user_provided_suffix=job.suffix,
    )


METRIC_EVENTS = ("metrics", "eval")
# OpenAI's names for the same metrics, added beside Tuneforge's own.
OPENAI_METRIC_NAMES = {
    "train_token_accuracy": "train_mean_token_accuracy",
    "valid_token_accuracy": "valid_mean_token_accuracy",
}


def _with_openai_metric_names(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, **{new: data[old] for old, new in OPENAI_METRIC_NAMES.items() if old in data}}


def event_id(job_id: str, seq: int) -> str:
    return f"{EVENT_ID_PREFIX}{job_id.removeprefix('ftjob-')}-{seq}"


def event_seq(job_id: str, after: str | None) -> int | None:
    """The seq an `after` cursor (an event id of this job) names, or a 422."""
    if after is None:
        return None
    prefix = event_id(job_id, 0)[:-1]
    seq = after.removeprefix(prefix)
    if not after.startswith(prefix) or not seq.isdigit() or len(seq) > 10:
        raise InvalidInput(
            f"after: no event of job {job_id} with id {clip(after)}", param="after", code=ErrorCode.invalid_cursor
        )
    return int(seq)


def event_object(job: Job, event: JobEvent) -> FineTuningEvent:
    metrics = event.type in METRIC_EVENTS
    data = dict(event.data)
    if metrics:
        data = {**_with_openai_metric_names(data), "total_steps": job.total_steps}
    return FineTuningEvent(
        id=event_id(job.id, event.seq),
        created_at=unix_time(event.created_at) or 0,
        level="warn" if event.level == "warning" else "error" if event.level == "error" else "info",
        message=event.message,
        type="metrics" if metrics else "message",
        data=data,
    )


def checkpoint_object(row: Checkpoint) -> FineTuningCheckpoint:
    return FineTuningCheckpoint(
        id=row.id,
        created_at=unix_time(row.created_at) or 0,
        fine_tuned_model_checkpoint=row.id,
        fine_tuning_job_id=row.job_id,
        metrics={"step": row.step, **_with_openai_metric_names(row.metrics)},
        step_number=row.step,
    )
