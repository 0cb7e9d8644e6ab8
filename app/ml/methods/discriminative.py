"""Discriminative fine-tuning (ULMFiT): the output layer and the top `n_layers` transformer blocks train, each
at its own learning rate, `learning_rate × lr_decay^depth` counted from the top (depth 0: the output layer,
depth 1: the top block, ...), so that the lower, more general layers change least."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Self

from pydantic import Field

from app.ml.hyperparameters import HyperparameterError, TrainingHyperparameters
from app.ml.methods import register
from app.ml.methods.delta import DeltaMethod, decoder_blocks, set_trainable
from app.ml.models import ModelRecord

if TYPE_CHECKING:
    from torch import nn


class DiscriminativeHyperparameters(TrainingHyperparameters):
    learning_rate: float = Field(5e-5, gt=0, le=1.0, description="The output layer's peak learning rate")
    lr_decay: float = Field(
        0.8, gt=0, le=1.0, description="Each block's learning rate is the one above it times lr_decay"
    )
    n_layers: int | None = Field(
        None, ge=1, le=10_000, description="Train the top n_layers blocks (default: all of them)"
    )

    def for_model(self, model: ModelRecord) -> Self:
        if self.n_layers is not None and model.n_layers is not None and self.n_layers > model.n_layers:
            raise HyperparameterError("n_layers", f"{model.id} has {model.n_layers} blocks")
        return super().for_model(model)


class DiscriminativeMethod(DeltaMethod):
    name = "discriminative"
    hyperparameters = DiscriminativeHyperparameters

    def _top_blocks(self, model: nn.Module, hp: TrainingHyperparameters) -> list[nn.Module]:
        """The trained blocks, top first (a model registered before its block count was known: at most all)."""
        assert isinstance(hp, DiscriminativeHyperparameters)
        blocks = list(reversed(decoder_blocks(model)))
        return blocks[: hp.n_layers] if hp.n_layers is not None else blocks

    def unfreeze(self, model: nn.Module, hp: TrainingHyperparameters) -> None:
        model.get_output_embeddings().weight.requires_grad_(True)  # type: ignore[operator]
        for block in self._top_blocks(model, hp):
            set_trainable(block.parameters())

    def param_groups(self, model: nn.Module, hp: TrainingHyperparameters) -> list[dict[str, Any]]:
        assert isinstance(hp, DiscriminativeHyperparameters)
        groups: list[dict[str, Any]] = [
            {"params": [model.get_output_embeddings().weight], "lr": hp.learning_rate}  # type: ignore[operator]
        ]
        for depth, block in enumerate(self._top_blocks(model, hp), start=1):
            groups.append({"params": list(block.parameters()), "lr": hp.learning_rate * hp.lr_decay**depth})
        return groups


register(DiscriminativeMethod())
