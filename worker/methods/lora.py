"""LoRA (Hu et al., 2021) with peft: low-rank updates to chosen linear layers, saved in PEFT format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peft import LoraConfig, get_peft_model
from torch import nn

from app.ml.hyperparameters import LoraHyperparameters, TrainingHyperparameters
from app.ml.registry import ModelRecord


class LoraMethod:
    name = "lora"
    artifact_format = "peft"

    def prepare(self, model: nn.Module, hp: TrainingHyperparameters) -> nn.Module:
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

    def param_groups(self, model: nn.Module, hp: TrainingHyperparameters) -> list[dict[str, Any]]:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": hp.learning_rate}]

    def export(self, model: nn.Module, folder: Path, base: ModelRecord) -> None:
        model.save_pretrained(str(folder))  # type: ignore[operator]
        # Name the base model so ecosystem tools (PEFT, vLLM, LoRAX) can find it.
        config_path = folder / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = base.base_model_name_or_path
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
