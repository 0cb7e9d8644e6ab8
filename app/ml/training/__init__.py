"""The training library: a recipe that trains any method over a base model, and its parts (data, loss, schedule,
memory). No database, queue or web framework: what it needs from above comes in as small protocols.

Its names load on first use (PEP 562): importing one torch-free part (`stepwise`'s constants and types, which the
API's Tinker routes read) does not import torch and the recipe with it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.ml.training.base_models import training_base_model
    from app.ml.training.data import Dataset, encode_examples, read_examples
    from app.ml.training.protocols import Checkpointer, Reporter, StopRequested, StopSignal, TrainingError
    from app.ml.training.recipe import Position, RecipeLimits, TrainingRecipe

_HOMES = {
    "training_base_model": "base_models",
    "Dataset": "data",
    "encode_examples": "data",
    "read_examples": "data",
    "Checkpointer": "protocols",
    "Reporter": "protocols",
    "StopRequested": "protocols",
    "StopSignal": "protocols",
    "TrainingError": "protocols",
    "Position": "recipe",
    "RecipeLimits": "recipe",
    "TrainingRecipe": "recipe",
}

__all__ = [
    "Checkpointer",
    "Dataset",
    "Position",
    "RecipeLimits",
    "Reporter",
    "StopRequested",
    "StopSignal",
    "TrainingError",
    "TrainingRecipe",
    "encode_examples",
    "read_examples",
    "training_base_model",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
