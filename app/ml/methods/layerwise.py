"""Layer-wise fine-tuning by gradual unfreezing (Howard & Ruder's ULMFiT): the output layer first, then one more
transformer block below it every `unfreeze_every` epochs (or steps), until every block trains.

Every block is in the optimizer from the start; a frozen one has no gradient, so AdamW leaves it (and its state)
alone until it is unfrozen, and the learning-rate schedule applies to each block from then on."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from app.ml.hyperparameters import TrainingHyperparameters
from app.ml.methods import register
from app.ml.methods.delta import DeltaMethod, decoder_blocks, set_trainable

if TYPE_CHECKING:
    from torch import nn


class LayerwiseHyperparameters(TrainingHyperparameters):
    learning_rate: float = Field(5e-5, gt=0, le=1.0, description="Peak learning rate (after the warmup)")
    unfreeze_every: int = Field(1, ge=1, le=1_000_000, description="Unfreeze one more block every this many units")
    unfreeze_unit: Literal["epochs", "steps"] = Field("epochs", description="What unfreeze_every counts")


class LayerwiseMethod(DeltaMethod):
    name = "layerwise"
    hyperparameters = LayerwiseHyperparameters

    def unfreeze(self, model: nn.Module, hp: TrainingHyperparameters) -> None:
        model.get_output_embeddings().weight.requires_grad_(True)  # type: ignore[operator]

    def param_groups(self, model: nn.Module, hp: TrainingHyperparameters) -> list[dict[str, object]]:
        params = [model.get_output_embeddings().weight]  # type: ignore[operator]
        for block in reversed(decoder_blocks(model)):
            params.extend(block.parameters())
        return [{"params": params, "lr": hp.learning_rate}]

    def before_step(
        self, model: nn.Module, hp: TrainingHyperparameters, *, step: int, epoch: int, steps_per_epoch: int
    ) -> str | None:
        assert isinstance(hp, LayerwiseHyperparameters)
        blocks = decoder_blocks(model)
        elapsed = epoch - 1 if hp.unfreeze_unit == "epochs" else step
        wanted = min(len(blocks), elapsed // hp.unfreeze_every)
        unfrozen = sum(1 for block in blocks if next(block.parameters()).requires_grad)
        if wanted <= unfrozen:
            return None
        for depth in range(unfrozen, wanted):
            set_trainable(blocks[len(blocks) - 1 - depth].parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        lowest = len(blocks) - wanted
        return (
            f"unfroze block {lowest} (blocks {lowest}-{len(blocks) - 1} of {len(blocks)} and the output layer now "
            f"train: {trainable:,} parameters)"
        )


register(LayerwiseMethod())
