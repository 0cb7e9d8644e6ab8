"""The learning-rate schedule and early stopping."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


def learning_rate_factor(total_steps: int, warmup_ratio: float, schedule: str) -> Callable[[int], float]:
    """The peak learning rate's multiplier at each step: a linear warmup from 0, then a linear or cosine decay
    to 0 at the last step."""
    warmup = int(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return factor


@dataclass
class EarlyStopping:
    """Tracks the best validation loss and a snapshot of the weights that reached it."""

    patience: int | None
    best: tuple[int, float, dict[str, torch.Tensor]] | None = None  # step, loss, trainable weights
    without_improvement: int = 0

    def observe(self, step: int, loss: float, snapshot: Callable[[], dict[str, torch.Tensor]]) -> None:
        if self.best is None or loss < self.best[1]:
            self.best = (step, loss, snapshot() if self.patience else {})  # a copy only when it may be restored
            self.without_improvement = 0
        else:
            self.without_improvement += 1

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.without_improvement >= self.patience
