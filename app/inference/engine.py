"""The process's serving engine: built from the settings on the first generation request, closed with the app."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from app.core.settings import Settings
from app.ml.device import resolve_placement
from app.ml.serving import EngineLimits, GenerationEngine


def engine_limits(settings: Settings) -> EngineLimits:
    """The engine's bounds, as the settings give them (TUNEFORGE_SERVING_*)."""
    return EngineLimits(
        max_batch=settings.serving_max_batch,
        max_waiting=settings.serving_max_waiting,
        kv_cache_bytes=settings.serving_kv_cache_bytes,
        max_adapters=settings.serving_max_adapters,
        adapter_bytes=settings.serving_adapter_cache_bytes,
        host_adapter_bytes=settings.serving_host_cache_bytes,
        disk_adapter_bytes=settings.serving_disk_cache_bytes,
        max_per_owner=settings.serving_max_requests_per_tenant,
    )


def generation_engine(state: Any) -> GenerationEngine:
    """The process's serving engine (`app.state`), created on first use (models load lazily inside it)."""
    with state.engine_lock:
        if state.engine is None:
            settings: Settings = state.settings
            state.engine = GenerationEngine(
                models=state.models,
                placement=resolve_placement(settings.device, settings.dtype),
                storage=state.storage,
                cache_dir=settings.data_dir / "adapter-cache",
                limits=engine_limits(settings),
            )
        return state.engine  # type: ignore[no-any-return]


def get_generation_engine(request: Request) -> GenerationEngine:
    return generation_engine(request.app.state)


EngineDep = Annotated[GenerationEngine, Depends(get_generation_engine)]
