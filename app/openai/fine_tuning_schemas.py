"""Request and response bodies of OpenAI's fine-tuning API (`/v1/fine_tuning/jobs…`), as its clients use them.

Tuneforge's methods other than OpenAI's `supervised` go through the same `method` object: `{"type": "ia3", "ia3":
{"hyperparameters": {…}}}`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema, create_model

from app.core.pagination import ListPage
from app.jobs.schemas import JobResources
from app.ml.methods import METHODS

MAX_ID_CHARS = 64
MAX_METADATA_PAIRS = 16  # OpenAI's limits on `metadata`
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512

# OpenAI's own method types: `supervised` and `dpo` train Tuneforge's default method (LoRA, or the method of the
# fine-tuned model a job continues from), `reinforcement` is refused.
OPENAI_METHOD_TYPES = ("supervised", "dpo", "reinforcement")
DEFAULT_METHOD = "lora"

Auto = Literal["auto"]


class OpenAIHyperparameters(BaseModel):
    """OpenAI's three hyperparameters, each a value or `"auto"` (Tuneforge's default)."""

    model_config = ConfigDict(extra="forbid")

    batch_size: Annotated[int, Field(ge=1, le=512)] | Auto | None = None
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=1000)] | Auto | None = Field(
        None, description="Times the method's default learning rate"
    )
    n_epochs: Annotated[int, Field(ge=1, le=100)] | Auto | None = None


class SupervisedSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: OpenAIHyperparameters | None = None


class DpoHyperparameters(OpenAIHyperparameters):
    beta: Annotated[float, Field(gt=0, le=10)] | Auto | None = Field(
        None, description="How far the policy may move from the reference (default 0.1)"
    )


class DpoSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: DpoHyperparameters | None = None


def _method_hyperparameters_schema(method: str) -> dict[str, Any]:
    schema = METHODS[method].hyperparameters.model_json_schema()
    return {
        **schema,
        "description": f'{method}\'s hyperparameters (as `POST /jobs` takes them); each may also be "auto" (the '
        "default), and `learning_rate_multiplier` may stand for `learning_rate`",
    }


def _method_section(method: str) -> Any:
    hyperparameters = Annotated[dict[str, Any], WithJsonSchema(_method_hyperparameters_schema(method))]
    return create_model(
        f"{method.title().replace('_', '')}Section",
        __config__=ConfigDict(extra="forbid"),
        hyperparameters=(hyperparameters | None, None),
    )


_TUNEFORGE_SECTIONS: dict[str, Any] = {
    name: (_method_section(name) | None, Field(None, description=f"With type {name}"))
    for name in METHODS
    if name not in OPENAI_METHOD_TYPES
}

# Accepted as any object so that the refusal names the method (`method.type: dpo … not supported`), not a field.
Unsupported = Annotated[
    dict[str, Any], WithJsonSchema({"type": "object", "additionalProperties": False, "description": "Not supported"})
]

_MethodBase = create_model(  # type: ignore[call-overload]
    "MethodBase",
    __config__=ConfigDict(extra="forbid"),
    supervised=(SupervisedSection | None, Field(None, description=f"With type supervised: {DEFAULT_METHOD}")),
    dpo=(DpoSection | None, Field(None, description=f"With type dpo: {DEFAULT_METHOD} trained with DPO")),
    reinforcement=(Unsupported | None, Field(None, max_length=16)),
    **_TUNEFORGE_SECTIONS,
)


class MethodObject(_MethodBase):  # type: ignore[misc, valid-type]
    """`type` names the method; the field of the same name holds its hyperparameters."""

    type: str = Field(
        max_length=MAX_ID_CHARS,
        description=f"`supervised` or `dpo` ({DEFAULT_METHOD}, or the method of the fine-tuned model the job "
        "continues from) or one of Tuneforge's methods; `reinforcement` is not supported",
        json_schema_extra={"enum": ["supervised", "dpo", *METHODS]},
    )


MetadataKey = Annotated[str, StringConstraints(max_length=MAX_METADATA_KEY_CHARS)]
MetadataValue = Annotated[str, StringConstraints(max_length=MAX_METADATA_VALUE_CHARS)]


class FineTuningJobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        max_length=128,
        description="The base model to fine-tune, or one of your fine-tuned models (adapter or checkpoint) to continue "
        "from (`GET /v1/models` lists them)",
    )
    training_file: str = Field(max_length=MAX_ID_CHARS, description="Id of an uploaded `fine-tune` file")
    validation_file: str | None = Field(None, max_length=MAX_ID_CHARS)
    hyperparameters: OpenAIHyperparameters | None = Field(
        None, description="OpenAI's deprecated place for the supervised hyperparameters: prefer `method`"
    )
    method: MethodObject | None = Field(None, description="The method and its hyperparameters (default: supervised)")
    suffix: str | None = Field(
        None, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$", description="Appended to the fine-tuned model's name"
    )
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    metadata: dict[MetadataKey, MetadataValue] | None = Field(None, max_length=MAX_METADATA_PAIRS)
    integrations: list[Unsupported] | None = Field(None, max_length=0, description="Not supported: none")
    resources: JobResources | None = Field(
        None,
        description="Tuneforge's, not OpenAI's (the openai client sends it with extra_body={\"resources\": "
        '{"devices": 4}}): how many devices the job trains on, as on POST /jobs',
    )


class FineTuningError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    """OpenAI's fine-tuning job object; `fine_tuned_model` is the adapter id (`model` in `/v1/chat/completions`)."""

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: FineTuningError | None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: dict[str, Any] = Field(description="batch_size, learning_rate_multiplier, n_epochs")
    method: dict[str, Any] = Field(description="`type` and, under the same name, every hyperparameter of the job")
    model: str
    organization_id: str = Field(description="The tenant the job belongs to")
    result_files: list[str]
    seed: int
    status: str
    trained_tokens: int | None = Field(description="Tokens trained on, all epochs (once the job has succeeded)")
    training_file: str
    validation_file: str | None
    estimated_finish: int | None
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None
    user_provided_suffix: str | None


class FineTuningEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any]


class FineTuningCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str = Field(description="Its id: a `model` for `/v1/chat/completions`")
    fine_tuning_job_id: str
    metrics: dict[str, Any]
    step_number: int


class FineTuningCheckpointList(ListPage[FineTuningCheckpoint]):
    first_id: str | None
    last_id: str | None
