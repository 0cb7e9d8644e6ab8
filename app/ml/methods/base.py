"""The interface every fine-tuning method implements, with the defaults most methods share.

A method says how it trains (`prepare`, `param_groups`, `before_step`), what it publishes (`export`) and how the
serving engine applies what it published (`serving`: one of app/ml/serving/kinds/). Two families share it:
- PEFT methods (`PeftMethod`: lora, qlora, prefix_tuning, prompt_tuning, p_tuning, ia3) wrap the base model with a
  `peft` config and publish PEFT's own format; the engine applies their adapters per row of a batch over the
  shared base model;
- weight-delta methods (`app/ml/methods/delta.py`: head, layerwise, discriminative, full) unfreeze some of the base
  model's own weights, and publish only the tensors they trained, with the sha256 of the base weights they apply to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from app.ml.hyperparameters import TrainingHyperparameters
from app.ml.models import ModelRecord

if TYPE_CHECKING:  # torch and peft load only where a model is trained or served, not in every API import
    from peft import PeftConfig
    from torch import nn

    from app.ml.device import Placement
    from app.ml.models import ModelStore
    from app.ml.serving.kinds import ServingKind


class MethodUnavailable(RuntimeError):
    """The method cannot train here (no CUDA device, a package missing); the message says what it needs."""


class StartWeightsMismatch(ValueError):
    """An artifact a job starts from does not fit the model the method prepared; the message says how."""


@dataclass(frozen=True)
class MethodContext:
    """What a method may need besides the model and its hyperparameters."""

    record: ModelRecord
    models: ModelStore
    placement: Placement


@dataclass(frozen=True)
class BaseWeights:
    """The base model an artifact is made for: written into every artifact's manifest."""

    record: ModelRecord
    weights_sha256: str  # ModelStore.weights_sha256: over the sha256 of each weight file


class FineTuningMethod:
    """One fine-tuning method: subclasses set the class attributes and implement `prepare` and `export`."""

    name: ClassVar[str]
    hyperparameters: ClassVar[type[TrainingHyperparameters]]
    artifact_format: ClassVar[str]  # "peft" (peft.PeftModel.from_pretrained loads it) or "delta" (safetensors)
    serving: ClassVar[ServingKind]  # how the serving engine applies the artifact
    needs_cuda: ClassVar[bool] = False  # POST /jobs refuses the method where no CUDA device can train it
    # Whether training may pack several examples into one row (padding-free, each example attending only to
    # itself): not for methods that put virtual tokens or a prefix before every sequence.
    packs_examples: ClassVar[bool] = True

    def load_base(self, ctx: MethodContext) -> nn.Module | None:
        """The base model to train, if the method loads its own (QLoRA: quantized); None takes the shared one."""
        return None

    def count_parameters(self, model: nn.Module) -> int:
        """The model's parameters as a job reports them (`total_parameters`): the base model's and the method's own;
        a weight the method only copied (an untied output layer) counts once."""
        return sum(p.numel() for p in model.parameters())

    def prepare(self, model: nn.Module, hp: TrainingHyperparameters, ctx: MethodContext) -> nn.Module:
        """Wrap or modify the base model so that what the method trains requires grad, and nothing else."""
        raise NotImplementedError

    def param_groups(self, model: nn.Module, hp: TrainingHyperparameters) -> list[dict[str, Any]]:
        """Optimizer parameter groups, each with its own `lr`: everything the method trains at any point of the
        job (a weight that is still frozen has no gradient, and AdamW leaves it alone until it has one). By
        default every weight that requires grad after `prepare`, at one rate."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": hp.learning_rate}]

    def before_step(
        self, model: nn.Module, hp: TrainingHyperparameters, *, step: int, epoch: int, steps_per_epoch: int
    ) -> str | None:
        """Called before each optimizer step (`step` counts from 0, `epoch` from 1), e.g. to unfreeze more of the
        model; returns a message for the job's events when it changed what trains. By default nothing."""
        return None

    def export(self, model: nn.Module, folder: Path, base: BaseWeights) -> None:
        """Write the trained artifact into `folder` in the method's standard format."""
        raise NotImplementedError

    def load_weights(self, model: nn.Module, folder: Path, ctx: MethodContext) -> None:
        """Put the weights of an artifact this method exported (`folder`) into the prepared `model`, trainable: a
        job that continues from a fine-tuned model starts from them. StartWeightsMismatch if they do not fit."""
        raise NotImplementedError


class PeftMethod(FineTuningMethod):
    """A method that `peft` implements: subclasses say how their hyperparameters become a `PeftConfig`."""

    artifact_format = "peft"

    def peft_config(self, hp: TrainingHyperparameters, ctx: MethodContext) -> PeftConfig:
        raise NotImplementedError

    def prepare(self, model: nn.Module, hp: TrainingHyperparameters, ctx: MethodContext) -> nn.Module:
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config(hp, ctx))  # type: ignore[arg-type]

    def export(self, model: nn.Module, folder: Path, base: BaseWeights) -> None:
        model.save_pretrained(str(folder))  # type: ignore[operator]
        # Name the base model so ecosystem tools (PEFT, vLLM, LoRAX) can find it.
        config_path = folder / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = base.record.base_model_name_or_path
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))

    def load_weights(self, model: nn.Module, folder: Path, ctx: MethodContext) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = load_file(str(folder / "adapter_model.safetensors"), device=str(ctx.placement.device))
        try:
            loaded: Any = set_peft_model_state_dict(model, state)
        except RuntimeError:  # a shape that differs: another rank, other virtual tokens
            raise StartWeightsMismatch("its tensors have other shapes than this job's") from None
        if loaded.unexpected_keys:
            raise StartWeightsMismatch(f"it has tensors this job's model lacks, e.g. {loaded.unexpected_keys[0]}")
