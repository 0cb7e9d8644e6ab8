"""The hyperparameters every fine-tuning method shares; each method's own live in its module (app/ml/methods/).

The API validates them at `POST /jobs`, so a bad value is a 422 naming the field, never a worker crash an
hour later.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from app.ml.models import ModelRecord


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
    learning_rate: float = Field(2e-4, gt=0, le=1.0, description="Peak learning rate (after the warmup)")
    max_seq_length: int = Field(512, ge=16, le=32768, description="Tokens per example; longer ones are cut")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed for shuffling, dropout and initialization")
    lr_scheduler: Literal["linear", "cosine"] = Field(
        "linear", description="How the learning rate decays to 0 after the warmup: linear or cosine"
    )
    warmup_ratio: float = Field(
        0.03, ge=0, le=0.5, description="Share of the steps over which the learning rate rises from 0 to its peak"
    )
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=64, description="Batches of batch_size whose gradients make one optimizer step"
    )
    eval_every: int | None = Field(
        None, ge=1, le=1_000_000, description="Also evaluate every this many steps (always at the end of each epoch)"
    )
    validation_split: float = Field(
        0.0,
        ge=0,
        le=0.5,
        description="Share of the training examples held out for evaluation; ignored when a validation file is given",
    )
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="Stop after this many evaluations without a lower validation loss; the weights of the best "
        "evaluation are published. Needs a validation file or validation_split",
    )

    checkpoint_every: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Also save a checkpoint every this many steps (always at the end of each epoch); each can be "
        "served and downloaded like an adapter, and a job interrupted by a crash resumes from the latest",
    )
    keep_checkpoints: int = Field(3, ge=1, le=20, description="How many of the latest checkpoints are kept")

    def reserved_positions(self) -> int:
        """Positions the method itself puts in every sequence (virtual tokens), besides the example's tokens."""
        return 0

    def held_out(self, n_examples: int) -> int:
        """Training examples `validation_split` holds out for evaluation (at least one when it is set)."""
        return max(1, round(n_examples * self.validation_split)) if self.validation_split > 0 else 0

    def steps_per_epoch(self, n_train: int) -> int:
        return math.ceil(n_train / (self.batch_size * self.gradient_accumulation_steps))

    def for_model(self, model: ModelRecord) -> Self:
        """These hyperparameters checked against the job's base model, with model-dependent defaults filled in."""
        reserved = self.reserved_positions()
        room = model.max_seq_length - reserved  # for the example's own tokens
        if "max_seq_length" not in self.model_fields_set:  # the default, for a model shorter than it
            return self.model_copy(update={"max_seq_length": min(self.max_seq_length, room)})
        if self.max_seq_length > room:
            if reserved:
                raise HyperparameterError(
                    "max_seq_length",
                    f"{model.id} takes {model.max_seq_length} positions, {reserved} of them virtual tokens here: "
                    f"at most {room} for text",
                )
            raise HyperparameterError("max_seq_length", f"{model.id} takes at most {model.max_seq_length} tokens")
        return self
