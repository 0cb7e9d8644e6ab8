"""Fine-tuning methods, one module each, registered by name.

A method module holds everything about its method: its hyperparameters (validated at `POST /jobs`), how it
prepares the base model, its optimizer parameter groups and per-step hook, how it exports its artifact, and
which serving kind (app/ml/serving/kinds/) the engine applies that artifact with. Adding a method is a new module
here and one `register(...)` call at its end, imported below.
"""

from __future__ import annotations

from app.ml.hyperparameters import TrainingHyperparameters
from app.ml.methods.base import FineTuningMethod

METHODS: dict[str, FineTuningMethod] = {}


def register(method: FineTuningMethod) -> FineTuningMethod:
    if method.name in METHODS:
        raise ValueError(f"method {method.name} is registered twice")
    METHODS[method.name] = method
    return method


def hyperparameter_classes() -> dict[str, type[TrainingHyperparameters]]:
    """Each method's hyperparameter class, by method name (what `POST /jobs` validates against)."""
    return {name: method.hyperparameters for name, method in METHODS.items()}


# Each import registers its method, in this order (the order `POST /jobs` lists them in).
# isort: off
from app.ml.methods import lora  # noqa: E402, F401
from app.ml.methods import qlora  # noqa: E402, F401
from app.ml.methods import prefix_tuning  # noqa: E402, F401
from app.ml.methods import prompt_tuning  # noqa: E402, F401
from app.ml.methods import p_tuning  # noqa: E402, F401
from app.ml.methods import ia3  # noqa: E402, F401
from app.ml.methods import head  # noqa: E402, F401
from app.ml.methods import layerwise  # noqa: E402, F401
from app.ml.methods import discriminative  # noqa: E402, F401
from app.ml.methods import full  # noqa: E402, F401
# isort: on

__all__ = ["METHODS", "FineTuningMethod", "hyperparameter_classes", "register"]
