"""The interface every fine-tuning method implements."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from torch import nn

from app.ml.hyperparameters import TrainingHyperparameters
from app.ml.registry import ModelRecord


class FineTuningMethod(Protocol):
    name: str
    artifact_format: str  # "peft": loadable with peft.PeftModel.from_pretrained

    def prepare(self, model: nn.Module, hp: TrainingHyperparameters) -> nn.Module:
        """Wrap or modify the base model so that only what the method trains requires grad."""
        ...

    def param_groups(self, model: nn.Module, hp: TrainingHyperparameters) -> list[dict[str, Any]]:
        """Optimizer parameter groups (one per learning rate)."""
        ...

    def export(self, model: nn.Module, folder: Path, base: ModelRecord) -> None:
        """Write the trained artifact into `folder` in the method's standard format."""
        ...
