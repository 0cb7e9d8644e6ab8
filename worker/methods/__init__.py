"""Fine-tuning methods, registered by name: adding one is a new module and one line in METHODS."""

from worker.methods.base import FineTuningMethod
from worker.methods.lora import LoraMethod

METHODS: dict[str, FineTuningMethod] = {
    "lora": LoraMethod(),
}

__all__ = ["METHODS", "FineTuningMethod"]
