"""Per-request sampling inside a batch: temperature, top-k, top-p, each request with its own random generator, so
a seeded request draws the same numbers whatever else shares its batch."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

from app.ml.serving.requests import GenerationRequest

if TYPE_CHECKING:
    import torch


class Sampler:
    def __init__(self, request: GenerationRequest, device: Any) -> None:
        import torch

        self.temperature = request.temperature
        self.top_k = request.top_k
        self.top_p = request.top_p
        self.generator: torch.Generator | None = None
        if not request.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(request.seed if request.seed is not None else secrets.randbits(63))

    def sample(self, logits: torch.Tensor) -> int:
        """A token drawn from one row's logits (float32, [vocabulary])."""
        import torch

        scores = logits / self.temperature
        if 0 < self.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=True)
            cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
            drop = cumulative - torch.softmax(ordered, dim=-1) > self.top_p  # keep the smallest set reaching top_p
            scores = scores.scatter(0, order, ordered.masked_fill(drop, float("-inf")))
        probabilities = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probabilities, 1, generator=self.generator))
