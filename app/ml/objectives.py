"""Training objectives (what loss a job trains with: supervised or DPO) and what a job stores of them beside its
method's hyperparameters. No torch import: the API validates with it.

A method says *what* trains, an objective *what loss*. A job's `hyperparameters` (a JSON column) hold its
method's hyperparameters and, for a DPO job, `"objective": "dpo"` and `beta`; a job that continues from a
fine-tuned model also holds `init_from` (the adapter or checkpoint id it starts from). A supervised job's are
exactly its method's, as before objectives existed.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Literal

from pydantic import BaseModel, Field

from app.ml.hyperparameters import TrainingHyperparameters
from app.ml.methods import METHODS

SFT = "sft"
DPO = "dpo"
OBJECTIVES = (SFT, DPO)
# Which format of training file each objective trains on (a file's `format`, from its lines at upload).
FILE_FORMATS = {SFT: ("chat", "prompt_completion", "text"), DPO: ("preference",)}
INIT_FROM = "init_from"  # the stored key: the adapter or checkpoint a job starts from
DEFAULT_BETA = 0.1


class PreferenceFields(BaseModel):
    """What a DPO job takes besides its method's hyperparameters."""

    objective: Literal["dpo"] = Field("dpo", description="The training objective (set by the job's `objective`)")
    beta: float = Field(
        DEFAULT_BETA,
        gt=0,
        le=10.0,
        description="DPO's temperature: how far the policy may move from the reference (TRL's and OpenAI's beta; "
        "lower lets it move further)",
    )


@cache
def hyperparameters_class(method: str, objective: str = SFT) -> type[TrainingHyperparameters]:
    """The hyperparameters a job of `method` with `objective` takes: the method's, plus DPO's `beta`."""
    base = METHODS[method].hyperparameters
    if objective == SFT:
        return base
    return type(f"Dpo{base.__name__}", (base, PreferenceFields), {"__module__": __name__})


def stored_hyperparameters(method: str, stored: dict[str, Any]) -> TrainingHyperparameters:
    """A job's hyperparameters as stored with it (`Job.hyperparameters`), read back with its objective's class."""
    values = {name: value for name, value in stored.items() if name != INIT_FROM}
    return hyperparameters_class(method, objective_of(stored)).model_validate(values)


def objective_of(stored: dict[str, Any]) -> str:
    return str(stored.get("objective", SFT))


def init_from(stored: dict[str, Any]) -> str | None:
    value = stored.get(INIT_FROM)
    return str(value) if value else None


def method_own_fields(method: str) -> list[str]:
    """The hyperparameters of `method` beyond those every method shares (lora_r, num_virtual_tokens, …): a job that
    continues from another takes them from it (they shape the weights it starts from)."""
    own = METHODS[method].hyperparameters.model_fields
    return [name for name in own if name not in TrainingHyperparameters.model_fields]
