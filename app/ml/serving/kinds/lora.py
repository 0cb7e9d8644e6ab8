"""LoRA's serving kind (lora, qlora; DoRA and rsLoRA options): low-rank updates of linear layers, each row of a
batch with its own matrices (app/ml/serving/layers.py applies them)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.ml.serving.kinds.base import (
    PEFT_CONFIG,
    PEFT_PREFIX,
    PEFT_WEIGHTS,
    HostAdapter,
    Servable,
    ServingKind,
    tensor_bytes,
)
from app.ml.serving.layers import LayerPlan, LayerWeights

if TYPE_CHECKING:
    import torch

    from app.ml.device import Placement
    from app.ml.serving.requests import AdapterRef


@dataclass
class LoraWeights(LayerWeights):
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scaling: float
    dora_scale: torch.Tensor | None = None  # DoRA: magnitude / ||W + scaling B A|| per output, [out]

    @classmethod
    def stack(cls, rows: list[Any], plan: LayerPlan, *, device: Any, dtype: Any) -> None:
        """Each row's matrices in `[rows, in, r]` and `[rows, r, out]` stacks (zeros for rows without LoRA in this
        layer; ranks padded with zeros to the largest), its scaling and its DoRA scale (ones without DoRA)."""
        import torch

        some: LoraWeights = next(w for w in rows if w is not None)
        n = len(rows)
        rank = max(w.a.shape[0] for w in rows if w is not None)
        width_in, width_out = some.a.shape[1], some.b.shape[0]
        a = torch.zeros((n, width_in, rank), device=device, dtype=dtype)
        b = torch.zeros((n, rank, width_out), device=device, dtype=dtype)
        scaling = torch.zeros((n, 1, 1), device=device, dtype=torch.float32)  # as a Python float: no rounding
        dora = None
        if any(w is not None and w.dora_scale is not None for w in rows):
            dora = torch.ones((n, 1, width_out), device=device, dtype=dtype)
        for i, w in enumerate(rows):
            if w is not None:
                r = w.a.shape[0]
                a[i, :, :r] = w.a.T
                b[i, :r, :] = w.b.T
                scaling[i] = w.scaling
                if dora is not None and w.dora_scale is not None:
                    dora[i, 0] = w.dora_scale
        plan.lora_a, plan.lora_b, plan.lora_scaling, plan.dora_scale = a, b, scaling, dora

    def alone(self, plan: LayerPlan) -> None:
        plan.lora_a, plan.lora_b, plan.lora_scaling, plan.dora_scale = self.a, self.b, self.scaling, self.dora_scale


class LoraKind(ServingKind):
    name = "lora"

    def read(self, ref: AdapterRef, folder: Path, *, weights_sha256: str, dtype: Any) -> HostAdapter:
        """Each adapted layer's (A, B, scaling, DoRA magnitude), from PEFT's files."""
        from safetensors.torch import load_file

        config = json.loads((folder / PEFT_CONFIG).read_text())
        tensors = load_file(str(folder / PEFT_WEIGHTS))
        alpha, rslora = float(config["lora_alpha"]), bool(config.get("use_rslora"))
        layers: dict[str, tuple[Any, Any, float, Any]] = {}
        for key, a in tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            name = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
            b = tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"]
            rank = a.shape[0]
            module_alpha = float(config.get("alpha_pattern", {}).get(name.rsplit(".", 1)[-1], alpha))
            scaling = module_alpha / (rank**0.5 if rslora else rank)
            layers[name] = (a, b, scaling, tensors.get(f"{PEFT_PREFIX}{name}.lora_magnitude_vector"))
        n_bytes = tensor_bytes([t for a, b, _, m in layers.values() for t in (a, b, m) if t is not None])
        return HostAdapter(ref=ref, folder=folder, kind=self, payload=layers, n_bytes=n_bytes)

    def materialize(
        self, host: HostAdapter, plain: Any, hook_ids: dict[str, tuple[int, int]], placement: Placement
    ) -> Servable:
        import torch

        device, dtype = placement.device, placement.dtype
        servable = Servable(ref=host.ref)
        tensors = []
        with torch.no_grad():
            for name, (a, b, scaling, magnitude) in host.payload.items():
                a, b = a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)
                dora_scale = None
                if magnitude is not None:  # DoRA: magnitude / ||W + scaling B A|| per output, as PEFT computes it
                    module = plain.get_submodule(name)
                    weight = module.weight.to(dtype)
                    if type(module).__name__ == "Conv1D":  # GPT-2 stores its weights transposed
                        weight = weight.T
                    norm = torch.linalg.norm(weight + scaling * (b @ a), dim=1).to(weight.dtype)
                    dora_scale = magnitude.to(device=device, dtype=dtype) / norm
                servable.layers[name] = LoraWeights(a=a, b=b, scaling=scaling, dora_scale=dora_scale)
                tensors += [a, b] + ([dora_scale] if dora_scale is not None else [])
        servable.n_bytes = tensor_bytes(tensors)
        return servable


LORA = LoraKind()
