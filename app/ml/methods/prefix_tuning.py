"""Prefix tuning (Li & Liang, 2021) with peft: learned keys and values prepended in every attention layer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Self

from pydantic import Field

from app.ml.hyperparameters import HyperparameterError, TrainingHyperparameters
from app.ml.methods import register
from app.ml.methods.base import MethodContext, PeftMethod
from app.ml.methods.virtual_tokens import VirtualTokenHyperparameters
from app.ml.models import ModelRecord
from app.ml.serving.kinds import PREFIX

if TYPE_CHECKING:
    from peft import PeftConfig


DEFAULT_PROJECTION_WIDTH = 512


class PrefixTuningHyperparameters(VirtualTokenHyperparameters):
    learning_rate: float = Field(5e-2, gt=0, le=1.0, description="Peak learning rate (after the warmup)")
    prefix_projection: bool = Field(
        False,
        description="Produce the prefixes through a trained two-layer MLP (reparameterization) instead of "
        "learning them directly",
    )
    encoder_hidden_size: int | None = Field(
        None,
        ge=1,
        le=1024,
        description=f"With prefix_projection: the MLP's hidden width (default {DEFAULT_PROJECTION_WIDTH}; its output "
        "layer has this many times 2 x layers x key/value width parameters)",
    )

    def for_model(self, model: ModelRecord) -> Self:
        if self.encoder_hidden_size is not None and not self.prefix_projection:
            raise HyperparameterError("encoder_hidden_size", "is only used with prefix_projection=true")
        return super().for_model(model)


class PrefixTuningMethod(PeftMethod):
    name = "prefix_tuning"
    hyperparameters = PrefixTuningHyperparameters
    serving = PREFIX
    packs_examples = False  # the virtual tokens come before each example

    def peft_config(self, hp: TrainingHyperparameters, ctx: MethodContext) -> PeftConfig:
        from peft import PrefixTuningConfig

        assert isinstance(hp, PrefixTuningHyperparameters)
        config = PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=hp.num_virtual_tokens, prefix_projection=hp.prefix_projection
        )
        if hp.prefix_projection:  # PEFT's default width is the model's, which on a 7B model makes a 1B-weight MLP
            config.encoder_hidden_size = hp.encoder_hidden_size or DEFAULT_PROJECTION_WIDTH
        return config


register(PrefixTuningMethod())
