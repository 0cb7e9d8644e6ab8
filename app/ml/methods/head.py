"""Standard fine-tuning: the output layer only, everything else frozen.

On a model whose output layer is tied to its input embeddings (SmolLM2), the output layer is untied first and
trained alone: the input embeddings stay as they were (see app/ml/methods/delta.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from app.ml.hyperparameters import TrainingHyperparameters
from app.ml.methods import register
from app.ml.methods.delta import DeltaMethod

if TYPE_CHECKING:
    from torch import nn


class HeadHyperparameters(TrainingHyperparameters):
    learning_rate: float = Field(2e-3, gt=0, le=1.0, description="Peak learning rate (after the warmup)")


class HeadMethod(DeltaMethod):
    name = "head"
    hyperparameters = HeadHyperparameters

    def unfreeze(self, model: nn.Module, hp: TrainingHyperparameters) -> None:
        model.get_output_embeddings().weight.requires_grad_(True)  # type: ignore[operator]


register(HeadMethod())
