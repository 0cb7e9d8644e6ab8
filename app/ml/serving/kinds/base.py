"""What every serving kind shares: the interface the engine and the adapter cache call, and the forms an adapter
takes on its way from the disk to a batch.

A kind reads an artifact's files into host memory on a loader thread (`read`: no model needed), then makes it
ready to apply on the engine thread (`materialize`: it may read the base model). The engine then asks the
`Servable` only what every kind answers: which linear layers it changes per row (`layers`, applied by the batch
hooks), how many positions it puts before the prompt (`virtual_tokens`, with `prefill_inputs`), and whether it
needs a model of its own (`own_model`: its requests run in a lane of their own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from app.ml.device import Placement
    from app.ml.serving.kv_cache import BatchKVCache
    from app.ml.serving.layers import LayerWeights
    from app.ml.serving.requests import AdapterRef

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


class ArtifactMismatch(ValueError):
    """The artifact does not fit the base model it is served on (other weights, other shapes), or is malformed."""


@dataclass
class HostAdapter:
    """An adapter read from its files into host memory, before anything that needs the model."""

    ref: AdapterRef
    folder: Path
    kind: ServingKind
    payload: Any = None  # what the kind read (tensors on the CPU), for its `materialize`
    n_bytes: int = 0


@dataclass
class PrefillInputs:
    """What a prompt's prefill feeds the model besides the positions: `input_ids` or `inputs_embeds`, a KV cache
    already holding the adapter's own positions (or None), and the position the prompt's first token takes."""

    kwargs: dict[str, Any]
    cache: BatchKVCache | None = None
    start: int = 0


@dataclass
class Servable:
    """An adapter as the engine applies it, on the serving device."""

    ref: AdapterRef
    n_bytes: int = 0
    layers: dict[str, LayerWeights] = field(default_factory=dict)  # applied per row by the base model's hooks
    virtual_tokens: int = 0  # positions it puts before every prompt
    own_model: Any = None  # a model of its own (its requests run in their own lane); None: the shared base model

    def prefill_inputs(self, model: Any, ids: torch.Tensor) -> PrefillInputs:
        """The prefill's inputs for one prompt (`ids`: [1, n]); the plain prompt unless the kind puts positions of
        its own before it."""
        return PrefillInputs({"input_ids": ids})


class ServingKind:
    """How the engine applies one family of artifacts (LoRA, IA3, soft prompt, prefix, weight delta). A method
    names its kind (`FineTuningMethod.serving`); the engine and the adapter cache know only this interface."""

    name: str

    def read(self, ref: AdapterRef, folder: Path, *, weights_sha256: str, dtype: Any) -> HostAdapter:
        """The artifact's files read into host memory (a loader thread: no model needed). By default nothing is
        read ahead: `materialize` reads the folder."""
        return HostAdapter(ref=ref, folder=folder, kind=self)

    def materialize(
        self, host: HostAdapter, plain: Any, hook_ids: dict[str, tuple[int, int]], placement: Placement
    ) -> Servable:
        """The servable form on the placement's device (the engine thread: it may read the base model `plain`;
        `hook_ids` are the batch hooks on it, which a copy of the model must not keep)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<serving kind {self.name}>"


def tensor_bytes(tensors: list[Any]) -> int:
    return sum(int(t.numel() * t.element_size()) for t in tensors)
