"""How the serving engine applies each family of artifacts, one class per kind with one interface
(`ServingKind`): LoRA (and DoRA, rsLoRA), IA3, soft prompt, prefix, weight delta. A fine-tuning method names its
kind (`FineTuningMethod.serving`, app/ml/methods/); the engine and the adapter cache call only the interface."""

from app.ml.serving.kinds.base import ArtifactMismatch, HostAdapter, PrefillInputs, Servable, ServingKind
from app.ml.serving.kinds.delta import WEIGHT_DELTA, DeltaMismatch, WeightDelta
from app.ml.serving.kinds.ia3 import IA3
from app.ml.serving.kinds.lora import LORA
from app.ml.serving.kinds.prompts import PREFIX, SOFT_PROMPT

__all__ = [
    "IA3",
    "LORA",
    "PREFIX",
    "SOFT_PROMPT",
    "WEIGHT_DELTA",
    "ArtifactMismatch",
    "DeltaMismatch",
    "HostAdapter",
    "PrefillInputs",
    "Servable",
    "ServingKind",
    "WeightDelta",
]
