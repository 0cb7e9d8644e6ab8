"""P-tuning (Liu et al., 2021) with peft: a soft prompt produced by a small trained prompt encoder (an MLP)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from app.ml.hyperparameters import TrainingHyperparameters
from app.ml.methods import register
from app.ml.methods.base import MethodContext
from app.ml.methods.virtual_tokens import SoftPromptMethod, VirtualTokenHyperparameters

if TYPE_CHECKING:
    from peft import PeftConfig


class PTuningHyperparameters(VirtualTokenHyperparameters):
    learning_rate: float = Field(1e-3, gt=0, le=1.0, description="Peak learning rate (after the warmup)")
    encoder_hidden_size: int = Field(128, ge=1, le=1024, description="Hidden width of the prompt encoder (an MLP)")


class PTuningMethod(SoftPromptMethod):
    name = "p_tuning"
    hyperparameters = PTuningHyperparameters

    def peft_config(self, hp: TrainingHyperparameters, ctx: MethodContext) -> PeftConfig:
        from peft import PromptEncoderConfig

        assert isinstance(hp, PTuningHyperparameters)
        return PromptEncoderConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=hp.num_virtual_tokens,
            encoder_hidden_size=hp.encoder_hidden_size,
            encoder_reparameterization_type="MLP",
        )


register(PTuningMethod())
