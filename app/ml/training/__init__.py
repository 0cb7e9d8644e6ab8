"""The training library: a recipe that trains any method over a base model, and its parts (data, loss, schedule,
memory). No database, queue or web framework: what it needs from above comes in as small protocols."""

from app.ml.training.base_models import training_base_model
from app.ml.training.data import Dataset, encode_examples, read_examples
from app.ml.training.protocols import Checkpointer, Reporter, StopRequested, StopSignal, TrainingError
from app.ml.training.recipe import Position, RecipeLimits, TrainingRecipe

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
