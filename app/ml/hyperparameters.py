"""Hyperparameters per fine-tuning method, shared by the API and the worker.

The API validates them at `POST /jobs`, so a bad value is a 422 naming the field, never a worker crash an
hour later. Adding a method adds its class here and one line to METHOD_HYPERPARAMETERS.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

# The linear layers of a LLaMA block, which LoRA may adapt.
LLAMA_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


ModuleNames = Annotated[list[Annotated[str, StringConstraints(max_length=64)]], Field(min_length=1, max_length=64)]


class TrainingHyperparameters(BaseModel):
    """What every method shares."""

    # strict: `true` or "2" is not a number of epochs (JSON integers are still accepted for float fields).
    model_config = ConfigDict(extra="forbid", strict=True)

    n_epochs: int = Field(3, ge=1, le=100, description="Passes over the training file")
    batch_size: int = Field(4, ge=1, le=512, description="Examples per optimizer step")
    learning_rate: float = Field(2e-4, gt=0, le=1.0, description="Peak learning rate (linear decay)")
    max_seq_length: int = Field(512, ge=16, le=32768, description="Tokens per example; longer ones are cut")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed for shuffling, dropout and initialization")


class LoraHyperparameters(TrainingHyperparameters):
    lora_r: int = Field(8, ge=1, le=256, description="Rank of the low-rank update")
    lora_alpha: int = Field(16, ge=1, le=1024, description="Scaling numerator (update scaled by alpha/r)")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input")
    target_modules: ModuleNames | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description=f"Modules to adapt: a subset of {', '.join(LLAMA_LINEAR_MODULES)}, or 'all-linear'",
    )

    @field_validator("target_modules")
    @classmethod
    def _known_modules(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, str):
            return value
        if not value:
            raise ValueError("must name at least one module")
        unknown = [m for m in value if m not in LLAMA_LINEAR_MODULES]
        if unknown:
            raise ValueError(
                f"unknown module(s) {', '.join(unknown[:8])}; choose from {', '.join(LLAMA_LINEAR_MODULES)}"
            )
        return sorted(set(value), key=LLAMA_LINEAR_MODULES.index)


METHOD_HYPERPARAMETERS: dict[str, type[TrainingHyperparameters]] = {
    "lora": LoraHyperparameters,
}
