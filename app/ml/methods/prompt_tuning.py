"""Prompt tuning (Lester et al., 2021) with peft: a soft prompt of learned input embeddings, nothing else."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Self

from pydantic import Field

from app.ml.hyperparameters import HyperparameterError, TrainingHyperparameters
from app.ml.methods import register
from app.ml.methods.base import BaseWeights, MethodContext
from app.ml.methods.virtual_tokens import SoftPromptMethod, VirtualTokenHyperparameters
from app.ml.models import ModelRecord

if TYPE_CHECKING:
    from peft import PeftConfig
    from torch import nn


class PromptTuningHyperparameters(VirtualTokenHyperparameters):
    learning_rate: float = Field(3e-2, gt=0, le=1.0, description="Peak learning rate (after the warmup)")
    prompt_init: Literal["random", "text"] = Field(
        "random", description="Start the soft prompt from random embeddings or from the embeddings of prompt_init_text"
    )
    prompt_init_text: str | None = Field(
        None,
        min_length=1,
        max_length=2000,
        description="With prompt_init='text': the text whose token embeddings start the soft prompt (repeated or "
        "cut to num_virtual_tokens)",
    )

    def for_model(self, model: ModelRecord) -> Self:
        if self.prompt_init == "text" and self.prompt_init_text is None:
            raise HyperparameterError("prompt_init_text", "prompt_init='text' needs a prompt_init_text")
        if self.prompt_init == "random" and self.prompt_init_text is not None:
            raise HyperparameterError("prompt_init_text", "is only used with prompt_init='text'")
        return super().for_model(model)


class PromptTuningMethod(SoftPromptMethod):
    name = "prompt_tuning"
    hyperparameters = PromptTuningHyperparameters

    def peft_config(self, hp: TrainingHyperparameters, ctx: MethodContext) -> PeftConfig:
        from peft import PromptTuningConfig, PromptTuningInit

        assert isinstance(hp, PromptTuningHyperparameters)
        if hp.prompt_init == "text":
            return PromptTuningConfig(
                task_type="CAUSAL_LM",
                num_virtual_tokens=hp.num_virtual_tokens,
                prompt_tuning_init=PromptTuningInit.TEXT,
                prompt_tuning_init_text=hp.prompt_init_text,
                tokenizer_name_or_path=str(ctx.models.tokenizer_dir(ctx.record)),
            )
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=hp.num_virtual_tokens)

    def export(self, model: nn.Module, folder: Path, base: BaseWeights) -> None:
        super().export(model, folder, base)
        # A text-initialized prompt names the tokenizer it was initialized with: this machine's folder, which
        # means nothing elsewhere (and must not leak). Name the base model instead, as PEFT's own docs do.
        config_path = folder / "adapter_config.json"
        config = json.loads(config_path.read_text())
        if config.get("tokenizer_name_or_path"):
            config["tokenizer_name_or_path"] = base.record.base_model_name_or_path
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


register(PromptTuningMethod())
