"""The weight-delta serving kind (head, layerwise, discriminative, full): an artifact that replaces some of the
base model's own weights. Its requests run in a lane of their own, on a copy of the base model that shares every
tensor the delta does not replace (a `head` delta costs its output layer, not a model).

The artifact (written by app/ml/methods/delta.py) is a folder with `delta.safetensors`, the trained tensors named
as in the base model's state dict, and `delta_config.json`: the method, the base model and the sha256 of its
weights, whether the output layer was untied from the input embeddings, and the tensor names. Loading checks the
base model's weights against that sha256 and refuses another base model.
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.ml.serving.kinds.base import ArtifactMismatch, HostAdapter, Servable, ServingKind

if TYPE_CHECKING:
    import torch

    from app.ml.device import Placement
    from app.ml.serving.requests import AdapterRef

FORMAT = "tuneforge-delta"
CONFIG = "delta_config.json"
TENSORS = "delta.safetensors"


class DeltaMismatch(ArtifactMismatch):
    """The artifact was made for other base weights than the model it is applied to, or is malformed."""


class WeightDelta:
    """A loaded weight-delta artifact: its tensors and how to apply them (`config`)."""

    def __init__(self, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        self.tensors = tensors
        self.config = config

    @property
    def n_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def load_delta(folder: Path, *, weights_sha256: str, device: Any, dtype: Any) -> WeightDelta:
    """Read an artifact, refusing one made for other base weights (DeltaMismatch says which)."""
    from safetensors.torch import load_file

    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError):
        raise DeltaMismatch("its delta_config.json is missing or not JSON") from None
    if config.get("format") != FORMAT:
        raise DeltaMismatch(f"it is not a {FORMAT} artifact")
    if config.get("base_model_weights_sha256") != weights_sha256:
        raise DeltaMismatch(
            f"it was trained on other weights of {config.get('base_model')} (sha256 "
            f"{str(config.get('base_model_weights_sha256'))[:12]}…, the served model's are {weights_sha256[:12]}…)"
        )
    tensors = load_file(str(folder / TENSORS), device=str(device))
    if sorted(tensors) != sorted(config.get("tensors", [])):
        raise DeltaMismatch("its tensors do not match its delta_config.json")
    return WeightDelta({name: t.to(dtype) for name, t in tensors.items()}, config)


def delta_model(
    plain: Any, delta: WeightDelta, hook_ids: dict[str, tuple[int, int]], *, device: Any, dtype: Any
) -> Any:
    """A copy of `plain` with the delta's tensors, sharing every other tensor with it. Ties stay as they were in
    training: a tensor shared by two layers is replaced in both, and a tied output layer that the artifact trained
    alone gets its own weight. The copy serves its own rows only: the batch hooks are taken off it."""
    from torch import nn

    params = dict(plain.named_parameters(remove_duplicate=False))
    unknown = [name for name in delta.tensors if name not in params]
    if unknown:
        raise DeltaMismatch(f"the base model has no tensor {unknown[0]}")
    output_name = delta.config.get("output_weight")
    untie = bool(delta.config.get("untied_output")) and output_name in delta.tensors
    replace: dict[int, nn.Parameter] = {}
    for name, tensor in delta.tensors.items():
        if params[name].shape != tensor.shape and not (untie and name == output_name):
            raise DeltaMismatch(f"{name} has shape {tuple(tensor.shape)}, the base model's {tuple(params[name].shape)}")
        if not (untie and name == output_name):
            replace[id(params[name])] = nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False)
    memo: dict[int, Any] = {id(t): t for t in itertools.chain(plain.parameters(), plain.buffers())}
    model: Any = copy.deepcopy(plain, memo)
    for module in model.modules():
        for key, param in list(module._parameters.items()):
            if param is not None and id(param) in replace:
                module._parameters[key] = replace[id(param)]
    if untie:
        assert output_name is not None
        weight = delta.tensors[output_name].to(device=device, dtype=dtype)
        model.get_output_embeddings().weight = nn.Parameter(weight, requires_grad=False)
    for name, (pre, post) in hook_ids.items():
        module = model.get_submodule(name)
        module._forward_pre_hooks.pop(pre, None)
        module._forward_hooks.pop(post, None)
    return model


class WeightDeltaKind(ServingKind):
    name = "weight_delta"

    def read(self, ref: AdapterRef, folder: Path, *, weights_sha256: str, dtype: Any) -> HostAdapter:
        delta = load_delta(folder, weights_sha256=weights_sha256, device="cpu", dtype=dtype)
        return HostAdapter(ref=ref, folder=folder, kind=self, payload=delta, n_bytes=delta.n_bytes)

    def materialize(
        self, host: HostAdapter, plain: Any, hook_ids: dict[str, tuple[int, int]], placement: Placement
    ) -> Servable:
        model = delta_model(plain, host.payload, hook_ids, device=placement.device, dtype=placement.dtype)
        return Servable(ref=host.ref, own_model=model, n_bytes=host.payload.n_bytes)


WEIGHT_DELTA = WeightDeltaKind()
