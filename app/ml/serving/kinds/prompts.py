"""The prompt-learning serving kinds: learned positions before every prompt, in a request's prefill.

- soft prompt (prompt_tuning, p_tuning): learned embeddings before the prompt's, at positions 0..n-1;
- prefix (prefix_tuning): learned keys and values in every layer, which the prompt's tokens (at positions n..)
  attend to: the prefill starts from a KV cache that holds them.

PEFT computes the prompts from the artifact (it wraps the base model without changing it), once per adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from app.ml.serving.kinds.base import PEFT_CONFIG, HostAdapter, PrefillInputs, Servable, ServingKind, tensor_bytes

if TYPE_CHECKING:
    import torch

    from app.ml.device import Placement


def peft_prompt(host: HostAdapter, plain: Any, device: str) -> Any:
    """The adapter's prompt for a batch of one, as PEFT computes it from the artifact's folder."""
    import torch
    from peft import PeftModel

    if not (host.folder / PEFT_CONFIG).is_file():  # never let PEFT take a missing folder for a Hub repository id
        raise FileNotFoundError(host.folder / PEFT_CONFIG)
    wrapped = PeftModel.from_pretrained(plain, str(host.folder), adapter_name="serving", torch_device=device)
    with torch.no_grad():
        return wrapped.get_prompt(batch_size=1)


@dataclass
class SoftPrompt(Servable):
    embeddings: Any = None  # [virtual tokens, hidden]

    def prefill_inputs(self, model: Any, ids: torch.Tensor) -> PrefillInputs:
        """The virtual tokens at positions 0.., then the text."""
        import torch

        text = model.get_input_embeddings()(ids)
        return PrefillInputs({"inputs_embeds": torch.cat([self.embeddings[None].to(text.dtype), text], dim=1)})


class SoftPromptKind(ServingKind):
    name = "soft_prompt"

    def materialize(
        self, host: HostAdapter, plain: Any, hook_ids: dict[str, tuple[int, int]], placement: Placement
    ) -> Servable:
        prompt = peft_prompt(host, plain, str(placement.device))
        embeddings = prompt[0].to(plain.get_input_embeddings().weight.dtype)
        return SoftPrompt(
            ref=host.ref,
            virtual_tokens=int(embeddings.shape[0]),
            n_bytes=tensor_bytes([embeddings]),
            embeddings=embeddings,
        )


@dataclass
class Prefix(Servable):
    keys_values: list[tuple[Any, Any]] | None = None  # per layer, [1, heads, n, head dim]

    def prefill_inputs(self, model: Any, ids: torch.Tensor) -> PrefillInputs:
        """The prefix fills the first positions of the cache; the text comes after it."""
        from app.ml.serving.kv_cache import BatchKVCache

        assert self.keys_values is not None
        return PrefillInputs({"input_ids": ids}, BatchKVCache.holding(self.keys_values), start=self.virtual_tokens)


class PrefixKind(ServingKind):
    name = "prefix"

    def materialize(
        self, host: HostAdapter, plain: Any, hook_ids: dict[str, tuple[int, int]], placement: Placement
    ) -> Servable:
        prompt = peft_prompt(host, plain, str(placement.device))
        layers = getattr(prompt, "layers", None)  # a transformers Cache, or (older) a tuple of (keys, values)
        keys_values = [(layer.keys, layer.values) for layer in layers] if layers is not None else list(prompt)
        return Prefix(
            ref=host.ref,
            virtual_tokens=int(keys_values[0][0].shape[-2]),
            n_bytes=tensor_bytes([t for kv in keys_values for t in kv]),
            keys_values=keys_values,
        )


SOFT_PROMPT = SoftPromptKind()
PREFIX = PrefixKind()
