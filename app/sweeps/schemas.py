"""Sweeps' request and response bodies (native API: `POST /sweeps`, `GET /sweeps/{id}`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema

from app.evals.schemas import CompletionsSource
from app.ml.methods import METHODS

MAX_ID_CHARS = 64
MAX_GRID_VALUES = 16
MAX_CONFIGURATIONS = 256  # the most TUNEFORGE_SWEEP_MAX_CONFIGURATIONS allows; the setting bounds each sweep
Scalar = (
    bool
    | Annotated[int, Field(ge=-(10**12), le=10**12)]
    | Annotated[float, Field(ge=-1e12, le=1e12)]
    | Annotated[str, StringConstraints(max_length=200)]
)
# A configuration's hyperparameters, as POST /jobs takes them (checked the same way, per configuration).
HYPERPARAMETERS_DOCUMENT = {
    "type": "object",
    "maxProperties": 64,
    "propertyNames": {"maxLength": 64},
    "additionalProperties": {},
}
Hyperparameters = Annotated[dict[str, Any], WithJsonSchema(HYPERPARAMETERS_DOCUMENT)]
Method = Annotated[str, StringConstraints(max_length=MAX_ID_CHARS)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Configuration(Strict):
    method: Method = Field(description="A fine-tuning method", json_schema_extra={"enum": list(METHODS)})
    hyperparameters: Hyperparameters = Field(default_factory=dict)


class Grid(Strict):
    """Every method with every combination of the hyperparameters' values (the cartesian product)."""

    methods: list[Method] = Field(min_length=1, max_length=len(METHODS))
    hyperparameters: dict[
        Annotated[str, StringConstraints(max_length=64)], Annotated[list[Scalar], Field(max_length=MAX_GRID_VALUES)]
    ] = Field(default_factory=dict, max_length=16, json_schema_extra={"maxProperties": 16})


class EvalDataSource(CompletionsSource):
    """A `completions` data source whose model is left out: each configuration's adapter answers."""

    model: Annotated[str, StringConstraints(max_length=400)] | None = None  # type: ignore[assignment]


class Objective(Strict):
    """What ranks the configurations: the validation loss at each job's end (lower wins), or the pass rate of one
    criterion of an eval run on each job's adapter (higher wins; it runs on the serving engine as any eval run)."""

    type: Literal["validation_loss", "eval"] = "validation_loss"
    eval_id: Annotated[str, StringConstraints(max_length=MAX_ID_CHARS)] | None = Field(
        None, description="type eval: the eval whose run scores each adapter"
    )
    testing_criteria: Annotated[str, StringConstraints(max_length=256)] | None = Field(
        None, description="type eval: the name of the criterion whose pass rate is the objective"
    )
    data_source: EvalDataSource | None = Field(
        None,
        description="type eval: the run's data source (OpenAI's `completions` shape); its `model` is each "
        "configuration's adapter",
    )


class Budget(Strict):
    max_parallel: int = Field(1, ge=1, le=64, description="Jobs of the sweep queued or running at once")
    max_total_steps: int | None = Field(
        None,
        ge=1,
        le=10**9,
        description="Optimizer steps the sweep may plan in all: a configuration whose planned steps would pass it is "
        "skipped (steps that early elimination saves are given back)",
    )


class EarlyElimination(Strict):
    rule: Literal["successive_halving", "none"] = Field(
        "successive_halving",
        description="Asynchronous successive halving (ASHA, Li et al. 2020): at each rung (min_steps, then eta times "
        "as many steps, ...), a configuration whose validation loss is not in the best 1/eta of those that reached "
        "the rung so far is stopped there; `none` trains every configuration to its end",
    )
    eta: int = Field(2, ge=2, le=8, description="How much each rung narrows the field (2: the better half goes on)")
    min_steps: int | None = Field(
        None,
        ge=1,
        le=10**7,
        description="The first rung's step (default: the first configuration's steps over eta², a quarter for eta 2)",
    )


class SweepCreate(Strict):
    name: Annotated[str, StringConstraints(max_length=256)] | None = None
    base_model: Annotated[str, StringConstraints(max_length=128)] | None = None
    training_file: Annotated[str, StringConstraints(max_length=MAX_ID_CHARS)]
    validation_file: Annotated[str, StringConstraints(max_length=MAX_ID_CHARS)] | None = None
    configurations: list[Configuration] | None = Field(None, min_length=1, max_length=MAX_CONFIGURATIONS)
    grid: Grid | None = None
    objective: Objective = Field(default_factory=lambda: Objective.model_validate({}))
    budget: Budget = Field(default_factory=lambda: Budget.model_validate({}))
    early_elimination: EarlyElimination = Field(default_factory=lambda: EarlyElimination.model_validate({}))


class TrialResult(BaseModel):
    rank: int | None
    position: int
    method: str
    hyperparameters: dict[str, Any]
    job_id: str | None
    status: str
    objective: float | None
    stopped_early: bool
    stopped_at_step: int | None
    steps: int
    planned_steps: int
    trainable_parameters: int
    peak_memory_bytes: int | None
    tokens_per_second: float | None
    wall_seconds: float | None
    adapter_id: str | None
    error: str | None


class Savings(BaseModel):
    steps_trained: int
    steps_without_elimination: int
    saved_fraction: float


class SweepObject(BaseModel):
    object: Literal["sweep"] = "sweep"
    id: str
    name: str
    status: str
    created_at: int
    finished_at: int | None
    objective: dict[str, Any]
    early_elimination: dict[str, Any]
    budget: dict[str, Any]
    rungs: list[int]
    results: list[TrialResult]
    winner: TrialResult | None
    savings: Savings
    error: str | None
