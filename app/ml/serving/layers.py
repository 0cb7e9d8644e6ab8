"""Per-row adapters inside one batch: each row's linear layers changed by its own adapter.

The base model's linear layers get forward hooks (their parameters keep their names and nothing is copied). Before
each forward pass the engine sets a `BatchAdapters` plan: for each hooked layer, what the rows' weights of each
kind (`LayerWeights`: LoRA, IA3; app/ml/serving/kinds/) stack into, e.g. each row's LoRA matrices gathered into
`[rows, in, r]` and `[rows, r, out]` and applied with two batched matmuls, as Punica's BGMV and S-LoRA do. The plan
of a batch is built when its rows change, not at every step. A batch whose rows all use one adapter (a prefill)
takes that adapter's own tensors with plain matmuls, the computation PEFT does. The arithmetic follows PEFT's
order, so a row's output equals the adapter loaded alone in PEFT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.hooks import RemovableHandle


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


class LayerWeights:
    """An adapter's weights for one linear layer, of one kind (LoRA, IA3): how rows with weights of this kind go
    into a batch's plan."""

    @classmethod
    def stack(cls, rows: list[Any], plan: LayerPlan, *, device: Any, dtype: Any) -> None:
        """Fill `plan` for a batch whose row i has the weights `rows[i]` (of this class), or none of this kind."""
        raise NotImplementedError

    def alone(self, plan: LayerPlan) -> None:
        """Fill `plan` for a batch whose every row uses these weights: their own tensors, as PEFT computes."""
        raise NotImplementedError


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


def plan_rows(rows: list[dict[str, LayerWeights] | None], *, device: Any, dtype: Any) -> dict[str, LayerPlan]:
    """The plan for a batch whose row i uses the per-layer weights `rows[i]` (layer name -> weights of any
    kind), or no adapter (None)."""
    present = [row for row in rows if row]
    if not present:
        return {}
    plan: dict[str, LayerPlan] = {}
    if all(row is present[0] for row in rows):  # one adapter for the whole batch: its own tensors, as PEFT
        for name, own in present[0].items():
            plan[name] = LayerPlan(shared=True)
            own.alone(plan[name])
        return plan
    for name in dict.fromkeys(name for row in present for name in row):
        layer = plan[name] = LayerPlan()
        per_row = [row.get(name) if row else None for row in rows]
        for kind in dict.fromkeys(type(w) for w in per_row if w is not None):
            kind.stack([w if type(w) is kind else None for w in per_row], layer, device=device, dtype=dtype)
    return plan
