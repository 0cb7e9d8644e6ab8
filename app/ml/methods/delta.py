"""Weight-delta methods: they train some of the base model's own weights (head, layerwise, discriminative, full)
and publish only those tensors, not a whole checkpoint.

The artifact is a folder with
- `delta.safetensors`: the trained tensors, named as in the base model's state dict (loadable with
  `model.load_state_dict(safetensors.torch.load_file(...), strict=False)` on the untouched base model);
- `delta_config.json`: the method, the base model (id, `base_model_name_or_path`, revision) and the sha256 of its
  weights, whether the output layer was untied from the input embeddings, and the tensor names.
Serving reads it back (app/ml/serving/kinds/delta.py), checks the base model's weights against that sha256 and
refuses another base model.

Models whose output layer shares its weight with the input embeddings (tied, like SmolLM2's): `head`,
`layerwise` and `discriminative` untie it first, so that they train the output layer alone and the input
embeddings stay as they were; the artifact then holds the output layer's own weight, and loading unties it the
same way. `full` keeps the tie: the shared matrix trains as one, as in the base model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from app.ml.hyperparameters import TrainingHyperparameters
from app.ml.methods.base import BaseWeights, FineTuningMethod, MethodContext, StartWeightsMismatch
from app.ml.serving.kinds import WEIGHT_DELTA
from app.ml.serving.kinds.delta import CONFIG, FORMAT, TENSORS

if TYPE_CHECKING:
    import torch
    from torch import nn


# --- the model's parts -------------------------------------------------------------------------------
def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks, bottom to top: the ModuleList with as many entries as the config has layers
    (`model.layers` in LLaMA and Qwen, `transformer.h` in GPT-2, `gpt_neox.layers` in GPT-NeoX)."""
    from torch import nn

    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return list(module)
    raise ValueError("cannot find the model's transformer blocks")


def output_weight_name(model: nn.Module) -> str:
    """The name of the output layer's weight in `model.state_dict()` (e.g. `lm_head.weight`)."""
    output = model.get_output_embeddings()  # type: ignore[operator]
    for name, module in model.named_modules():
        if module is output:
            return f"{name}.weight"
    raise ValueError("cannot find the model's output layer")


def untie_output(model: nn.Module) -> bool:
    """Give the output layer its own copy of the weight it shares with the input embeddings; True if it did."""
    from torch import nn

    output = model.get_output_embeddings()  # type: ignore[operator]
    if output.weight is not model.get_input_embeddings().weight:  # type: ignore[operator]
        return False
    output.weight = nn.Parameter(output.weight.detach().clone(), requires_grad=output.weight.requires_grad)
    model.config.tie_word_embeddings = False  # type: ignore[union-attr]
    model.config.tuneforge_untied_output = True  # type: ignore[union-attr]  # for count_parameters
    return True


def set_trainable(params: Iterator[torch.nn.Parameter] | list[torch.nn.Parameter], trainable: bool = True) -> None:
    for param in params:
        param.requires_grad_(trainable)


# --- the method family ---------------------------------------------------------------------------------
class DeltaMethod(FineTuningMethod):
    """Trains base weights in place; subclasses choose which (`unfreeze`) and may add groups or a schedule."""

    artifact_format = "delta"
    serving = WEIGHT_DELTA
    unties_output: ClassVar[bool] = True  # train the output layer apart from tied input embeddings

    def prepare(self, model: nn.Module, hp: TrainingHyperparameters, ctx: MethodContext) -> nn.Module:
        set_trainable(model.parameters(), False)
        if self.unties_output:
            untie_output(model)
        self.unfreeze(model, hp)
        return model

    def unfreeze(self, model: nn.Module, hp: TrainingHyperparameters) -> None:
        raise NotImplementedError

    def count_parameters(self, model: nn.Module) -> int:
        total = super().count_parameters(model)
        if getattr(model.config, "tuneforge_untied_output", False):  # the copy is the base's output layer still
            total -= model.get_output_embeddings().weight.numel()  # type: ignore[operator]
        return total

    def export(self, model: nn.Module, folder: Path, base: BaseWeights) -> None:
        from safetensors.torch import save_file

        tensors = {
            name: param.detach().to("cpu").contiguous()
            for name, param in model.named_parameters()
            if param.requires_grad
        }
        save_file(tensors, str(folder / TENSORS), metadata={"format": FORMAT})
        output_weight = output_weight_name(model)
        config = {
            "format": FORMAT,
            "version": 1,
            "method": self.name,
            "base_model": base.record.id,
            "base_model_name_or_path": base.record.base_model_name_or_path,
            "base_model_revision": base.record.revision,
            "base_model_weights_sha256": base.weights_sha256,
            "untied_output": self.unties_output and output_weight in tensors,
            "output_weight": output_weight,
            "tensors": sorted(tensors),
        }
        (folder / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))

    def load_weights(self, model: nn.Module, folder: Path, ctx: MethodContext) -> None:
        """The delta's tensors copied over the prepared model's (the output layer untied as in training)."""
        import torch
        from safetensors.torch import load_file

        config = json.loads((folder / CONFIG).read_text())
        if config.get("base_model_weights_sha256") != ctx.models.weights_sha256(ctx.record):
            raise StartWeightsMismatch(f"it was trained on other weights of {config.get('base_model')}")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in load_file(str(folder / TENSORS)).items():
                if name not in params or params[name].shape != tensor.shape:
                    raise StartWeightsMismatch(f"its tensor {name} does not fit this job's model")
                params[name].copy_(tensor)
