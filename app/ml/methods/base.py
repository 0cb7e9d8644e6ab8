"""The interface every fine-tuning method implements, with the defaults most methods share."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from app.ml.hyperparameters import TrainingHyperparameters
from app.ml.registry import ModelRecord

if TYPE_CHECKING:  # torch and peft load only where a model is trained or served, not in every API import
    from torch import nn


class FineTuningMethod:
    """One fine-tuning method: subclasses set the class attributes and implement `prepare`, `export`, `attach`."""

    name: ClassVar[str]
    hyperparameters: ClassVar[type[TrainingHyperparameters]]
    artifact_format: ClassVar[str]  # "peft": loadable with peft.PeftModel.from_pretrained

    def prepare(self, model: nn.Module, hp: TrainingHyperparameters) -> nn.Module:
        """Wrap or modify the base model so that only what the method trains requires grad."""
        raise NotImplementedError

    def param_groups(self, model: nn.Module, hp: TrainingHyperparameters) -> list[dict[str, Any]]:
        """Optimizer parameter groups (one per learning rate); by default every trainable weight at one rate."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": hp.learning_rate}]

    def on_epoch_start(self, model: nn.Module, optimizer: Any, epoch: int, hp: TrainingHyperparameters) -> None:
        """Called before each epoch (1-based), e.g. to unfreeze more of the model; by default nothing."""

    def export(self, model: nn.Module, folder: Path, base: ModelRecord) -> None:
        """Write the trained artifact into `folder` in the method's standard format."""
        raise NotImplementedError

    def attach(self, model: nn.Module, folder: Path, name: str, device: str) -> nn.Module:
        """Serving: add the artifact in `folder` to `model` (a base model, or one that already holds artifacts
        of this method) under `name`, and return the model to generate with."""
        raise NotImplementedError
