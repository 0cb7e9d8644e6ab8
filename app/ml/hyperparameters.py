"""Hyperparameters per fine-tuning method, shared by the API and the worker.

The API validates them at `POST /jobs`, so a bad value is a 422 naming the field, never a worker crash an
hour later. Adding a method adds its class here and one line to METHOD_HYPERPARAMETERS.
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from app.ml.registry import ModelRecord


class HyperparameterError(ValueError):
    """A hyperparameter does not suit the job's base model; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


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

    def for_model(self, model: ModelRecord) -> Self:
        """These hyperparameters checked against the job's base model, with model-dependent defaults filled in."""
        if "max_seq_length" not in self.model_fields_set:  # the default, for a model shorter than it
            return self.model_copy(update={"max_seq_length": min(self.max_seq_length, model.max_seq_length)})
        if self.max_seq_length > model.max_seq_length:
            raise HyperparameterError("max_seq_length", f"{model.id} takes at most {model.max_seq_length} tokens")
        return self


class LoraHyperparameters(TrainingHyperparameters):
    lora_r: int = Field(8, ge=1, le=256, description="Rank of the low-rank update")
    lora_alpha: int = Field(16, ge=1, le=1024, description="Scaling numerator (update scaled by alpha/r)")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input")
    target_modules: ModuleNames | Literal["all-linear"] | None = Field(
        None,
        description="Linear layers to adapt, by name (see `linear_modules` in GET /v1/models/{id}), or 'all-linear'. "
        "Default: the model's `default_target_modules` (PEFT's default for its architecture)",
    )

    def for_model(self, model: ModelRecord) -> Self:
        checked = super().for_model(model)
        if self.target_modules is None:
            return checked.model_copy(update={"target_modules": list(model.default_target_modules)})
        if self.target_modules == "all-linear":
            return checked
        unknown = [name for name in self.target_modules if name not in model.linear_modules]
        if unknown:
            raise HyperparameterError(
                "target_modules",
                f"{', '.join(unknown[:8])} is not a linear layer of {model.id} ({model.architecture}); "
                f"its linear layers: {', '.join(model.linear_modules)}",
            )
        ordered = [name for name in model.linear_modules if name in self.target_modules]
        return checked.model_copy(update={"target_modules": ordered})


METHOD_HYPERPARAMETERS: dict[str, type[TrainingHyperparameters]] = {
    "lora": LoraHyperparameters,
}
