"""LoRA (Hu et al., 2021) with peft: low-rank updates to chosen linear layers, saved in PEFT format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Self

from pydantic import Field

from app.ml.hyperparameters import HyperparameterError, ModuleNames, TrainingHyperparameters
from app.ml.methods import register
from app.ml.methods.base import FineTuningMethod
from app.ml.registry import ModelRecord

if TYPE_CHECKING:
    from torch import nn


class LoraHyperparameters(TrainingHyperparameters):
    lora_r: int = Field(8, ge=1, le=256, description="Rank of the low-rank update")
    lora_alpha: int = Field(16, ge=1, le=1024, description="Scaling numerator (update scaled by alpha/r)")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input")
    target_modules: ModuleNames | Literal["all-linear"] | None = Field(
        None,
        description="Linear layers to adapt, by name (see `linear_modules` in GET /v1/models/{id}), or 'all-linear'. "
        "Default: the model's `default_target_modules` (PEFT's default for its architecture)",
    )

    def for_model(self, model: ModelRecord) -> Self:
        checked = super().for_model(model)
        if self.target_modules is None:
            return checked.model_copy(update={"target_modules": list(model.default_target_modules)})
        if self.target_modules == "all-linear":
            return checked
        unknown = [name for name in self.target_modules if name not in model.linear_modules]
        if unknown:
            raise HyperparameterError(
                "target_modules",
                f"{', '.join(unknown[:8])} is not a linear layer of {model.id} ({model.architecture}); "
                f"its linear layers: {', '.join(model.linear_modules)}",
            )
        ordered = [name for name in model.linear_modules if name in self.target_modules]
        return checked.model_copy(update={"target_modules": ordered})


class LoraMethod(FineTuningMethod):
    name = "lora"
    hyperparameters = LoraHyperparameters
    artifact_format = "peft"

    def prepare(self, model: nn.Module, hp: TrainingHyperparameters) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        assert isinstance(hp, LoraHyperparameters)
        config = LoraConfig(
            r=hp.lora_r,
            lora_alpha=hp.lora_alpha,
            lora_dropout=hp.lora_dropout,
            target_modules=hp.target_modules,
            bias="none",
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, config)  # type: ignore[arg-type]

    def export(self, model: nn.Module, folder: Path, base: ModelRecord) -> None:
        model.save_pretrained(str(folder))  # type: ignore[operator]
        # Name the base model so ecosystem tools (PEFT, vLLM, LoRAX) can find it.
        config_path = folder / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = base.base_model_name_or_path
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))

    def attach(self, model: nn.Module, folder: Path, name: str, device: str) -> nn.Module:
        from peft import PeftModel

        if isinstance(model, PeftModel):
            model.load_adapter(str(folder), adapter_name=name, torch_device=device)
            return model
        return PeftModel.from_pretrained(model, str(folder), adapter_name=name, torch_device=device)


register(LoraMethod())
