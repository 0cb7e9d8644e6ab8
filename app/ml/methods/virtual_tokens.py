"""What the prompt-learning methods (prompt_tuning, p_tuning, prefix_tuning) share: learned virtual tokens in
front of every sequence, which take positions of the model's context like real ones."""

from __future__ import annotations

from typing import TYPE_CHECKING, Self

from pydantic import Field

from app.ml.hyperparameters import HyperparameterError, TrainingHyperparameters
from app.ml.methods.base import PeftMethod
from app.ml.models import ModelRecord
from app.ml.serving.kinds import SOFT_PROMPT

if TYPE_CHECKING:
    pass


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

    serving = SOFT_PROMPT
    packs_examples = False  # the virtual tokens come before each example
