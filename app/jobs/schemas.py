"""Request and response bodies for jobs and their events."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from app.core.models import Checkpoint, Job, JobStatus
from app.core.pagination import ListPage
from app.core.schemas import Schema, UnixTime, unix_time
from app.jobs.planning import JobSpec
from app.ml.methods import METHODS, hyperparameter_classes
from app.ml.objectives import OBJECTIVES, SFT, hyperparameters_class, objective_of

MAX_ID_CHARS = 64


def _hyperparameters_schema() -> dict[str, Any]:
    """The JSON schema of `hyperparameters`: one of the methods' hyperparameter objects."""
    return {
        "description": "Hyperparameters of the chosen method (with objective dpo, also `beta`); every field is "
        "optional",
        "anyOf": [
            {**model.model_json_schema(), "title": f"{method} hyperparameters"}
            for method, model in hyperparameter_classes().items()
        ]
        + [{**hyperparameters_class("lora", "dpo").model_json_schema(), "title": "lora hyperparameters with dpo"}],
    }


ESTIMATE_AFTER_STEPS = 3  # steps a running job must have done before its finish is estimated


def estimated_finish(job: Job) -> int | None:
    """Now plus the remaining steps at the average pace since this attempt started (which includes loading; a
    resumed attempt counts from the checkpoint's step)."""
    if job.status != JobStatus.running or not job.total_steps or job.started_at is None:
        return None
    done = job.step - int(job.metrics.get("resumed_from_step") or 0)
    if done < ESTIMATE_AFTER_STEPS:
        return None
    now = datetime.now(UTC)
    per_step = (now - job.started_at).total_seconds() / done
    return int(now.timestamp() + per_step * max(0, job.total_steps - job.step))


MAX_JOB_DEVICES = 64


class JobResources(BaseModel):
    model_config = ConfigDict(extra="forbid")

    devices: int = Field(
        1,
        ge=1,
        le=MAX_JOB_DEVICES,
        description="How many devices (GPUs; on a CPU worker, processes) the job trains on, one rank each: DDP for "
        "methods that train a few parameters, FSDP2 (sharded) for full fine-tuning. Only a worker that owns at "
        "least as many takes it (tuneforge worker --devices); objective sft only",
    )


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_model: str | None = Field(
        None,
        max_length=128,
        description="Registered base model id (default from settings), or one of your adapters or checkpoints (its "
        "id, or an adapter's name) to continue from its weights",
    )
    method: str | None = Field(
        None,
        max_length=MAX_ID_CHARS,
        description="Fine-tuning method (default lora; continuing from an adapter: its method, the only one allowed)",
        json_schema_extra={"enum": list(METHODS)},
    )
    objective: str = Field(
        SFT,
        max_length=16,
        description="What loss trains: sft (supervised, on chat, prompt/completion or text files) or dpo (direct "
        "preference optimization, on preference files; hyperparameter `beta`)",
        json_schema_extra={"enum": list(OBJECTIVES)},
    )
    training_file: str = Field(..., max_length=MAX_ID_CHARS, description="Id of an uploaded training file")
    validation_file: str | None = Field(None, max_length=MAX_ID_CHARS, description="Id of an uploaded validation file")
    suffix: str | None = Field(
        None, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$", description="Appended to the adapter name"
    )
    hyperparameters: Annotated[dict[str, Any], WithJsonSchema(_hyperparameters_schema())] = Field(
        default_factory=dict,
        examples=[{"n_epochs": 3, "batch_size": 4, "learning_rate": 0.0002, "lora_r": 8}],
    )
    resources: JobResources = Field(JobResources(devices=1), description="What the job trains on")
    dry_run: bool = Field(
        False,
        description="Check everything and answer 200 with the plan (examples, steps, tokens, estimated duration) "
        "instead of creating and queueing the job",
    )

    def spec(self) -> JobSpec:
        return JobSpec(
            base_model=self.base_model,
            method=self.method,
            training_file=self.training_file,
            validation_file=self.validation_file,
            suffix=self.suffix,
            hyperparameters=self.hyperparameters,
            objective=self.objective,
            devices=self.resources.devices,
        )


class DryRunObject(BaseModel):
    object: Literal["fine_tuning.job.dry_run"] = "fine_tuning.job.dry_run"
    base_model: str
    hyperparameters: dict[str, Any] = Field(description="As the job would have them, every default filled in")
    train_examples: int = Field(description="Examples trained on (the training file's, less any validation_split)")
    held_out_examples: int
    steps_per_epoch: int
    total_steps: int
    train_tokens_per_epoch: int = Field(description="An upper bound: each example counted up to max_seq_length")
    trainable_parameters: int = Field(description="What the method trains on this base model")
    estimated_stored_bytes: int = Field(
        description="The most the job will keep stored at once (its kept checkpoints and its adapter): what "
        "creating it reserves of your storage quota until it ends"
    )
    estimated_tokens_per_second: float | None
    estimated_duration_seconds: int | None = Field(
        description="At the median pace of your own last finished jobs of this method on this model (other "
        "tenants' jobs are not looked at); null until one has finished"
    )
    estimate_basis: str


class JobProgress(BaseModel):
    step: int
    total_steps: int | None
    epoch: int


class JobError(BaseModel):
    code: str
    message: str


class JobObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    base_model: str
    method: str
    objective: str = Field(description="sft or dpo")
    status: str
    training_file: str
    validation_file: str | None
    suffix: str | None
    hyperparameters: dict[str, Any]
    progress: JobProgress
    metrics: dict[str, Any]
    error: JobError | None
    adapter_id: str | None
    resources: JobResources
    device: str | None = Field(description="Where it trains or trained, e.g. cuda:0 or cpu (null until it starts)")
    dtype: str | None = Field(description="The base model's precision in training, e.g. bfloat16 or float32")
    attempt: int
    reserved_bytes: int = Field(
        description="Of your storage quota, what the job reserved at creation for its checkpoints and adapter (an "
        "estimate of the most it keeps at once): held, less what it has stored, while it is active"
    )
    last_event_seq: int = Field(description="The seq of its latest event (`GET /jobs/{id}/events?after=` reads on)")
    heartbeat_at: int | None = Field(description="When the worker training it last said it was alive")
    estimated_finish: int | None = Field(
        description="When training should end, from the pace so far (running jobs, after a few steps)"
    )
    created_at: int
    started_at: int | None
    finished_at: int | None

    @classmethod
    def of(cls, job: Job) -> JobObject:
        return cls(
            id=job.id,
            base_model=job.base_model,
            method=job.method,
            objective=objective_of(job.hyperparameters),
            status=job.status.value,
            training_file=job.training_file_id,
            validation_file=job.validation_file_id,
            suffix=job.suffix,
            hyperparameters=job.hyperparameters,
            progress=JobProgress(step=job.step, total_steps=job.total_steps, epoch=job.epoch),
            metrics=job.metrics,
            resources=JobResources(devices=job.devices),
            error=JobError(code=job.error_code or "training_failed", message=job.error) if job.error else None,
            adapter_id=job.adapter_id,
            device=job.device,
            dtype=job.dtype,
            attempt=job.attempt,
            reserved_bytes=job.reserved_bytes,
            last_event_seq=job.last_event_seq,
            heartbeat_at=unix_time(job.heartbeat_at),
            estimated_finish=estimated_finish(job),
            created_at=unix_time(job.created_at) or 0,
            started_at=unix_time(job.started_at),
            finished_at=unix_time(job.finished_at),
        )


class EventObject(Schema):
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    seq: int
    type: str
    level: str
    message: str
    data: dict[str, Any]
    created_at: UnixTime


class MetricsObject(BaseModel):
    object: Literal["fine_tuning.job.metrics"] = "fine_tuning.job.metrics"
    job_id: str
    curves: dict[str, list[tuple[int, float]]] = Field(
        description="Per metric, (step, value) in step order: train_loss, train_token_accuracy, learning_rate, "
        "tokens_per_second every step; valid_loss, valid_perplexity, valid_token_accuracy at each evaluation"
    )


class CheckpointObject(BaseModel):
    """A saved step of a job: serve it (`/generate` with `adapter_id` = its id) or download it like an adapter."""

    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    fine_tuning_job_id: str
    fine_tuned_model_checkpoint: str = Field(description="What /generate takes as `adapter_id`: this id")
    step_number: int
    epoch: int
    metrics: dict[str, Any] = Field(description="The last step's training metrics and the last evaluation's")
    format: str
    size_bytes: int
    sha256: str
    download_url: str
    created_at: int

    @classmethod
    def of(cls, row: Checkpoint) -> CheckpointObject:
        return cls(
            id=row.id,
            fine_tuning_job_id=row.job_id,
            fine_tuned_model_checkpoint=row.id,
            step_number=row.step,
            epoch=row.epoch,
            metrics=row.metrics,
            format=row.format,
            size_bytes=row.size_bytes,
            sha256=row.sha256,
            download_url=f"/adapters/{row.id}/download",
            created_at=unix_time(row.created_at) or 0,
        )


class JobDeleted(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    deleted: bool = True


class CheckpointDeleted(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    deleted: bool = True


# Every kept checkpoint of a job, in one page: nothing ever follows (a comment, not a docstring: the OpenAPI
# description of the list stays as it was).
class CheckpointList(ListPage[CheckpointObject]):
    has_more: bool = False
