"""Full fine-tuning: every weight of the base model trains (tied input and output embeddings stay tied and train
as one matrix). The artifact holds every tensor: as large as the model in float32."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from app.ml.hyperparameters import TrainingHyperparameters
from app.ml.methods import register
from app.ml.methods.delta import DeltaMethod, set_trainable

if TYPE_CHECKING:
    from torch import nn


class FullHyperparameters(TrainingHyperparameters):
    learning_rate: float = Field(2e-5, gt=0, le=1.0, description="Peak learning rate (after the warmup)")


class FullMethod(DeltaMethod):
    name = "full"
    hyperparameters = FullHyperparameters
    unties_output = False

    def unfreeze(self, model: nn.Module, hp: TrainingHyperparameters) -> None:
        set_trainable(model.parameters())


register(FullMethod())
