"""Prefix tuning (Li & Liang, 2021) with peft: learned keys and values prepended in every attention layer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Self

from pydantic import Field

from app.ml.hyperparameters import HyperparameterError, TrainingHyperparameters
from app.ml.methods import register
from app.ml.methods.base import GenerationCall, MethodContext, PeftMethod
from app.ml.methods.virtual_tokens import VirtualTokenHyperparameters
from app.ml.registry import ModelRecord

if TYPE_CHECKING:
    import torch
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
    serving_group = "prefix_tuning"
    leaves_base_unchanged = True

    def peft_config(self, hp: TrainingHyperparameters, ctx: MethodContext) -> PeftConfig:
        from peft import PrefixTuningConfig

        assert isinstance(hp, PrefixTuningHyperparameters)
        config = PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=hp.num_virtual_tokens, prefix_projection=hp.prefix_projection
        )
        if hp.prefix_projection:  # PEFT's default width is the model's, which on a 7B model makes a 1B-weight MLP
            config.encoder_hidden_size = hp.encoder_hidden_size or DEFAULT_PROJECTION_WIDTH
        return config

    def generation_call(self, model: Any, name: str, input_ids: torch.Tensor) -> GenerationCall:
        """The prefixes go to the base model's `generate` as a KV cache already holding `num_virtual_tokens`
        positions, behind as many placeholder ids (generate skips the ids its cache holds), so the text sits at the
        positions after the prefix, as in training. (PEFT's own `generate` hands transformers 5 the prefixes under
        a name it no longer reads, and the adapter is silently ignored.)"""
        import torch

        model.set_adapter(name)
        prefix = model.get_prompt(batch_size=1)
        n_virtual = model.active_peft_config.num_virtual_tokens
        placeholders = torch.zeros((1, n_virtual), dtype=input_ids.dtype, device=input_ids.device)
        ids = torch.cat([placeholders, input_ids], dim=1)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "past_key_values": prefix}
        return GenerationCall(model.get_base_model(), inputs, ids.shape[1])


register(PrefixTuningMethod())
