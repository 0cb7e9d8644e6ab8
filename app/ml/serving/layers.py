"""Per-row adapters inside one batch: LoRA (with DoRA and rsLoRA) and IA3 applied to each row by its own adapter.

The base model's linear layers get forward hooks (their parameters keep their names and nothing is copied). Before
each forward pass the engine sets a `BatchAdapters` plan: for each hooked layer, each row's LoRA matrices gathered
into `[rows, in, r]` and `[rows, r, out]` stacks (zeros for rows whose adapter does not touch the layer, or that
have none; ranks padded with zeros to the largest) and applied with two batched matmuls, as Punica's BGMV and
S-LoRA do; IA3 vectors gathered into `[rows, 1, width]` scales (ones elsewhere). The plan of a batch is built when
its rows change, not at every step. A batch whose rows all use one adapter (a prefill) takes that adapter's own
matrices with plain matmuls, the computation PEFT does. The arithmetic follows PEFT's order, so a row's output
equals the adapter loaded alone in PEFT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.hooks import RemovableHandle


@dataclass
class LoraWeights:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scaling: float
    dora_scale: torch.Tensor | None = None  # DoRA: magnitude / ||W + scaling B A|| per output, [out]


@dataclass
class LayerPlan:
    """What to do in one linear layer for the batch's rows (None: nothing of that kind)."""

    scale_input: torch.Tensor | None = None  # IA3 feed-forward: [rows, 1, in]
    scale_output: torch.Tensor | None = None  # IA3: [rows, 1, out]
    lora_a: torch.Tensor | None = None  # [rows, in, r], or one adapter's [r, in] when `shared`
    lora_b: torch.Tensor | None = None  # [rows, r, out], or [out, r]
    lora_scaling: torch.Tensor | float = 1.0  # [rows, 1, 1], or a float when shared
    dora_scale: torch.Tensor | None = None  # [rows, 1, out] (ones for rows without DoRA), or [out]
    shared: bool = False  # one adapter for every row


class BatchAdapters:
    """The hooks on one base model and the plan of the batch running through it."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.plan: dict[str, LayerPlan] = {}
        self._handles: dict[str, tuple[RemovableHandle, RemovableHandle]] = {}

    def hook(self, names: list[str]) -> None:
        """Hook these linear layers (module names in the model), those not hooked yet."""
        for name in names:
            if name in self._handles:
                continue
            module = self.model.get_submodule(name)
            self._handles[name] = (
                module.register_forward_pre_hook(self._pre_hook(name)),
                module.register_forward_hook(self._post_hook(name)),
            )

    def remove(self) -> None:
        for pre, post in self._handles.values():
            pre.remove()
            post.remove()
        self._handles.clear()
        self.plan = {}

    def hook_ids(self) -> dict[str, tuple[int, int]]:
        """Each hooked layer's hook ids (to take them off a copy of the model)."""
        return {name: (pre.id, post.id) for name, (pre, post) in self._handles.items()}

    def _pre_hook(self, name: str) -> Any:
        def pre(module: nn.Module, args: tuple[Any, ...]) -> Any:
            plan = self.plan.get(name)
            if plan is None or plan.scale_input is None:
                return None
            return (args[0] * plan.scale_input, *args[1:])

        return pre

    def _post_hook(self, name: str) -> Any:
        def post(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Any:
            plan = self.plan.get(name)
            if plan is None:
                return None
            if plan.scale_output is not None:
                output = output * plan.scale_output
            if plan.lora_a is None:
                return output
            return output + _lora(module, args[0], output, plan)

        return post


def _lora(module: nn.Module, x: torch.Tensor, output: torch.Tensor, plan: LayerPlan) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    assert plan.lora_a is not None and plan.lora_b is not None
    if plan.shared:
        delta = F.linear(F.linear(x, plan.lora_a), plan.lora_b)
    else:
        delta = torch.bmm(torch.bmm(x, plan.lora_a), plan.lora_b)
    # Scaled in float32 (as a bfloat16 tensor times a Python float is), then back to the layer's dtype.
    if plan.dora_scale is None:
        return (delta * plan.lora_scaling).to(output.dtype)
    base = output
    bias = getattr(module, "bias", None)
    if bias is not None:
        base = base - bias
    return (plan.dora_scale - 1) * base + (plan.dora_scale * delta * plan.lora_scaling).to(output.dtype)


def plan_rows(rows: list[dict[str, Any] | None], *, device: Any, dtype: Any) -> dict[str, LayerPlan]:
    """The plan for a batch whose row i uses the per-layer weights `rows[i]` (layer name -> `LoraWeights`, or an
    IA3 `(vector, feedforward)`), or no adapter (None)."""
    import torch

    present = [row for row in rows if row]
    if not present:
        return {}
    if all(row is present[0] for row in rows):  # one adapter for the whole batch: its own matrices, as PEFT
        return {name: _shared(weights) for name, weights in present[0].items()}
    plan: dict[str, LayerPlan] = {}
    names = list(dict.fromkeys(name for row in present for name in row))
    n = len(rows)
    for name in names:
        layer = LayerPlan()
        loras = [row.get(name) if row else None for row in rows]
        if any(isinstance(w, LoraWeights) for w in loras):
            some = next(w for w in loras if isinstance(w, LoraWeights))
            rank = max(w.a.shape[0] for w in loras if isinstance(w, LoraWeights))
            width_in, width_out = some.a.shape[1], some.b.shape[0]
            a = torch.zeros((n, width_in, rank), device=device, dtype=dtype)
            b = torch.zeros((n, rank, width_out), device=device, dtype=dtype)
            scaling = torch.zeros((n, 1, 1), device=device, dtype=torch.float32)  # as a Python float: no rounding
            dora = None
            if any(isinstance(w, LoraWeights) and w.dora_scale is not None for w in loras):
                dora = torch.ones((n, 1, width_out), device=device, dtype=dtype)
            for i, w in enumerate(loras):
                if isinstance(w, LoraWeights):
                    r = w.a.shape[0]
                    a[i, :, :r] = w.a.T
                    b[i, :r, :] = w.b.T
                    scaling[i] = w.scaling
                    if dora is not None and w.dora_scale is not None:
                        dora[i, 0] = w.dora_scale
            layer.lora_a, layer.lora_b, layer.lora_scaling, layer.dora_scale = a, b, scaling, dora
        ia3 = [w if isinstance(w, tuple) else None for w in loras]
        for feedforward in (True, False):
            vectors = [w[0] if w is not None and w[1] == feedforward else None for w in ia3]
            if any(v is not None for v in vectors):
                width = next(v for v in vectors if v is not None).shape[0]
                scale = torch.ones((n, 1, width), device=device, dtype=dtype)
                for i, v in enumerate(vectors):
                    if v is not None:
                        scale[i, 0] = v
                if feedforward:
                    layer.scale_input = scale
                else:
                    layer.scale_output = scale
        plan[name] = layer
    return plan


def _shared(weights: Any) -> LayerPlan:
    if isinstance(weights, LoraWeights):
        return LayerPlan(
            lora_a=weights.a, lora_b=weights.b, lora_scaling=weights.scaling, dora_scale=weights.dora_scale, shared=True
        )
    vector, feedforward = weights
    return LayerPlan(scale_input=vector, shared=True) if feedforward else LayerPlan(scale_output=vector, shared=True)
