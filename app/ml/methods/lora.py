"""LoRA (Hu et al., 2021) with peft: low-rank updates to chosen linear layers, saved in PEFT format.

Options: DoRA (weight-decomposed LoRA, Liu et al., 2024) and rank-stabilized scaling (rsLoRA: alpha/sqrt(r)).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Self

from pydantic import Field

from app.ml.hyperparameters import HyperparameterError, ModuleNames, TrainingHyperparameters
from app.ml.methods import register
from app.ml.methods.base import MethodContext, PeftMethod
from app.ml.models import ModelRecord
from app.ml.serving.kinds import LORA

if TYPE_CHECKING:
    from peft import PeftConfig


def checked_module_names(field: str, names: list[str], model: ModelRecord) -> list[str]:
    """`names` in the model's order, or a HyperparameterError naming `field` and the model's linear layers."""
    unknown = [name for name in names if name not in model.linear_modules]
    if unknown:
        raise HyperparameterError(
            field,
            f"{', '.join(unknown[:8])} is not a linear layer of {model.id} ({model.architecture}); "
            f"its linear layers: {', '.join(model.linear_modules)}",
        )
    return [name for name in model.linear_modules if name in names]


class LoraHyperparameters(TrainingHyperparameters):
    lora_r: int = Field(8, ge=1, le=256, description="Rank of the low-rank update")
    lora_alpha: int = Field(16, ge=1, le=1024, description="Scaling numerator (update scaled by alpha/r)")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input")
    target_modules: ModuleNames | Literal["all-linear"] | None = Field(
        None,
        description="Linear layers to adapt, by name (see `linear_modules` in GET /v1/models/{id}), or 'all-linear'. "
        "Default: the model's `default_target_modules` (PEFT's default for its architecture)",
    )
    use_dora: bool = Field(False, description="DoRA: learn each adapted weight's magnitude apart from its direction")
    use_rslora: bool = Field(False, description="rsLoRA: scale the update by alpha/sqrt(r) instead of alpha/r")

    def for_model(self, model: ModelRecord) -> Self:
        checked = super().for_model(model)
        if self.target_modules is None:
            return checked.model_copy(update={"target_modules": list(model.default_target_modules)})
        if self.target_modules == "all-linear":
            return checked
        return checked.model_copy(
            update={"target_modules": checked_module_names("target_modules", self.target_modules, model)}
        )


class LoraMethod(PeftMethod):
    name = "lora"
    hyperparameters = LoraHyperparameters
    serving = LORA

    def peft_config(self, hp: TrainingHyperparameters, ctx: MethodContext) -> PeftConfig:
        from peft import LoraConfig

        assert isinstance(hp, LoraHyperparameters)
        return LoraConfig(
            r=hp.lora_r,
            lora_alpha=hp.lora_alpha,
            lora_dropout=hp.lora_dropout,
            target_modules=hp.target_modules,
            use_dora=hp.use_dora,
            use_rslora=hp.use_rslora,
            bias="none",
            task_type="CAUSAL_LM",
        )


register(LoraMethod())
