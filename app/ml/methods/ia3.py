"""IA3 (Liu et al., 2022) with peft: learned vectors that rescale the activations of chosen layers (keys, values
and the feed-forward down projection by default)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Self

from pydantic import Field, StringConstraints

from app.ml.hyperparameters import HyperparameterError, ModuleNames, TrainingHyperparameters
from app.ml.methods import register
from app.ml.methods.base import MethodContext, PeftMethod
from app.ml.methods.lora import checked_module_names
from app.ml.models import ModelRecord
from app.ml.serving.kinds import IA3

if TYPE_CHECKING:
    from peft import PeftConfig


def peft_ia3_defaults(model: ModelRecord) -> tuple[list[str], list[str]]:
    """PEFT's IA3 target and feed-forward modules for the architecture, as names of the model's linear layers."""
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
    )
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS,
    )

    # PEFT's names as it writes them: some are suffixes that tell two layers of one name apart ("mlp.c_proj" is
    # GPT-2's feed-forward output, not its attention's c_proj); PEFT matches them against the ends of module names.
    targets = [n for n in TARGETS.get(model.architecture, []) if n.rsplit(".", 1)[-1] in model.linear_modules]
    feedforward = [n for n in FEEDFORWARD.get(model.architecture, []) if n in targets]
    if not targets:  # an architecture PEFT has no mapping for: every linear layer, the last one as feed-forward
        targets = list(model.linear_modules)
        feedforward = targets[-1:]
    return targets, feedforward


class Ia3Hyperparameters(TrainingHyperparameters):
    learning_rate: float = Field(3e-3, gt=0, le=1.0, description="Peak learning rate (after the warmup)")
    target_modules: ModuleNames | None = Field(
        None,
        description="Linear layers whose activations are rescaled (see `linear_modules` in GET /v1/models/{id}). "
        "Default: PEFT's IA3 default for the architecture",
    )
    feedforward_modules: list[Annotated[str, StringConstraints(max_length=64)]] | None = Field(
        None,
        max_length=64,
        description="Which of target_modules are feed-forward layers (their input is rescaled, not their output). "
        "Default: PEFT's for the architecture",
    )

    def for_model(self, model: ModelRecord) -> Self:
        checked = super().for_model(model)
        default_targets, default_feedforward = peft_ia3_defaults(model)
        if self.target_modules is None:
            targets = default_targets
            feedforward = default_feedforward if self.feedforward_modules is None else self.feedforward_modules
        else:
            targets = checked_module_names("target_modules", self.target_modules, model)
            feedforward = (
                [n for n in default_feedforward if n in targets]
                if self.feedforward_modules is None
                else self.feedforward_modules
            )
        outside = [name for name in feedforward if name not in targets]
        if outside:
            raise HyperparameterError(
                "feedforward_modules", f"{', '.join(outside[:8])} is not in target_modules ({', '.join(targets)})"
            )
        return checked.model_copy(update={"target_modules": targets, "feedforward_modules": feedforward})


class Ia3Method(PeftMethod):
    name = "ia3"
    hyperparameters = Ia3Hyperparameters
    serving = IA3

    def peft_config(self, hp: TrainingHyperparameters, ctx: MethodContext) -> PeftConfig:
        from peft import IA3Config

        assert isinstance(hp, Ia3Hyperparameters)
        return IA3Config(
            task_type="CAUSAL_LM", target_modules=hp.target_modules, feedforward_modules=hp.feedforward_modules
        )


register(Ia3Method())
