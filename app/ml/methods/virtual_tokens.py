"""What the prompt-learning methods (prompt_tuning, p_tuning, prefix_tuning) share: learned virtual tokens in
front of every sequence, which take positions of the model's context like real ones."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Self

from pydantic import Field

from app.ml.hyperparameters import HyperparameterError, TrainingHyperparameters
from app.ml.methods.base import GenerationCall, PeftMethod
from app.ml.registry import ModelRecord

if TYPE_CHECKING:
    import torch


class VirtualTokenHyperparameters(TrainingHyperparameters):
    num_virtual_tokens: int = Field(20, ge=1, le=512, description="Learned virtual tokens put before every sequence")

    def reserved_positions(self) -> int:
        return self.num_virtual_tokens

    def for_model(self, model: ModelRecord) -> Self:
        if model.max_seq_length - self.num_virtual_tokens < 16:
            raise HyperparameterError(
                "num_virtual_tokens", f"{model.id} takes {model.max_seq_length} positions: leave at least 16 for text"
            )
        return super().for_model(model)


class SoftPromptMethod(PeftMethod):
    """Prompt and p-tuning: learned embeddings before the text's."""

    leaves_base_unchanged = True

    def generation_call(self, model: Any, name: str, input_ids: torch.Tensor) -> GenerationCall:
        """The soft prompt and the text's embeddings go to the base model's `generate` as `inputs_embeds`, at
        positions from 0 as in training. (PEFT's own `generate` numbers the positions after the first token
        without the virtual tokens under transformers 5, so its output drifts from what the adapter learned.)"""
        import torch

        model.set_adapter(name)
        base = model.get_base_model()
        text = base.get_input_embeddings()(input_ids)
        embeds = torch.cat([model.get_prompt(batch_size=1).to(text.dtype), text], dim=1)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=input_ids.device)
        return GenerationCall(base, {"inputs_embeds": embeds, "attention_mask": mask}, 0)  # output: new tokens only
