"""IA3's serving kind: learned vectors that rescale linear layers' outputs (or a feed-forward layer's input), each
row of a batch with its own (app/ml/serving/layers.py applies them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.ml.serving.kinds.base import PEFT_PREFIX, PEFT_WEIGHTS, HostAdapter, Servable, ServingKind, tensor_bytes
from app.ml.serving.layers import LayerPlan, LayerWeights

if TYPE_CHECKING:
    import torch

    from app.ml.device import Placement
    from app.ml.serving.requests import AdapterRef


@dataclass
class Ia3Weights(LayerWeights):
    vector: torch.Tensor  # [in] for a feed-forward layer, else [out]
    feedforward: bool  # the layer's input is rescaled, not its output

    @classmethod
    def stack(cls, rows: list[Any], plan: LayerPlan, *, device: Any, dtype: Any) -> None:
        """Each row's vector in a `[rows, 1, width]` scale (ones for rows without IA3 in this layer)."""
        import torch

        for feedforward in (True, False):
            vectors = [w.vector if w is not None and w.feedforward == feedforward else None for w in rows]
            if not any(v is not None for v in vectors):
                continue
            width = next(v for v in vectors if v is not None).shape[0]
            scale = torch.ones((len(rows), 1, width), device=device, dtype=dtype)
            for i, v in enumerate(vectors):
                if v is not None:
                    scale[i, 0] = v
            if feedforward:
                plan.scale_input = scale
            else:
                plan.scale_output = scale

    def alone(self, plan: LayerPlan) -> None:
        if self.feedforward:
            plan.scale_input = self.vector
        else:
            plan.scale_output = self.vector


class Ia3Kind(ServingKind):
    name = "ia3"

    def read(self, ref: AdapterRef, folder: Path, *, weights_sha256: str, dtype: Any) -> HostAdapter:
        from safetensors.torch import load_file

        vectors = {}
        for key, vector in load_file(str(folder / PEFT_WEIGHTS)).items():
            name = key.removeprefix(PEFT_PREFIX).removesuffix(".ia3_l")
            vectors[name] = (vector.flatten(), vector.shape[0] == 1)  # feed-forward: [1, in]; else [out, 1]
        n_bytes = tensor_bytes([v for v, _ in vectors.values()])
        return HostAdapter(ref=ref, folder=folder, kind=self, payload=vectors, n_bytes=n_bytes)

    def materialize(
        self, host: HostAdapter, plain: Any, hook_ids: dict[str, tuple[int, int]], placement: Placement
    ) -> Servable:
        servable = Servable(ref=host.ref)
        for name, (vector, feedforward) in host.payload.items():
            on_device = vector.to(device=placement.device, dtype=placement.dtype)
            servable.layers[name] = Ia3Weights(vector=on_device, feedforward=feedforward)
        servable.n_bytes = tensor_bytes([w.vector for w in servable.layers.values()])  # type: ignore[attr-defined]
        return servable


IA3 = Ia3Kind()
