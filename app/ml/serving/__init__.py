"""The serving engine: continuous batching of requests for many adapters over one base model (see engine.py)."""

from app.ml.serving.engine import EngineLimits, GenerationEngine
from app.ml.serving.requests import (
    GREEDY_BELOW_TEMPERATURE,
    AdapterRef,
    AdapterUnavailable,
    Delta,
    EngineClosed,
    EngineOverloaded,
    Generation,
    GenerationRequest,
    GenerationResult,
    OwnerOverloaded,
    TokenLogprob,
)
from app.ml.serving.residency import MAX_BASE_MODELS, MAX_DELTA_MODELS

__all__ = [
    "GREEDY_BELOW_TEMPERATURE",
    "MAX_BASE_MODELS",
    "MAX_DELTA_MODELS",
    "AdapterRef",
    "AdapterUnavailable",
    "Delta",
    "EngineClosed",
    "EngineLimits",
    "EngineOverloaded",
    "Generation",
    "GenerationEngine",
    "GenerationRequest",
    "GenerationResult",
    "OwnerOverloaded",
    "TokenLogprob",
]
