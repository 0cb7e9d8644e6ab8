"""What the benchmarks share of Tuneforge's own set-up, so that each measures the service as configured."""

from __future__ import annotations

import dataclasses
from typing import Any

from app.core.settings import Settings
from app.inference.engine import engine_limits
from app.ml.serving import EngineLimits


def serving_limits(**changes: Any) -> EngineLimits:
    """The serving engine's bounds as the service's settings give them (TUNEFORGE_SERVING_*), with `changes`."""
    return dataclasses.replace(engine_limits(Settings()), **changes)
