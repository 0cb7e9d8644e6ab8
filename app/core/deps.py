"""FastAPI dependencies, declared once as `Annotated` aliases."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.core.db import session_scope
from app.core.errors import Unauthorized
from app.core.models import Tenant
from app.core.settings import Settings
from app.core.storage import ObjectStorage
from app.ml.device import resolve_placement
from app.ml.registry import ModelStore
from app.ml.serving import EngineLimits, GenerationEngine


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def get_storage(request: Request) -> ObjectStorage:
    return request.app.state.storage  # type: ignore[no-any-return]


def get_model_store(request: Request) -> ModelStore:
    return request.app.state.models  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
StorageDep = Annotated[ObjectStorage, Depends(get_storage)]
ModelStoreDep = Annotated[ModelStore, Depends(get_model_store)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    """The request's unit of work: services flush, the request commits (or rolls back on error)."""
    with session_scope(settings.db_url) as session:
        yield session


# scope="function": commit before the response is sent, so a client never reads what is not stored yet.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


# Declared for the OpenAPI document (the docs' "Authorize" button); the key itself is checked by
# `AuthenticationMiddleware` before the request body is read, which leaves the tenant in the request state.
bearer_scheme = HTTPBearer(auto_error=False, description="An API key: `tuneforge keys create --tenant NAME`")


def get_tenant(
    request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)] = None
) -> Tenant:
    tenant = getattr(request.state, "tenant", None)
    if tenant is None:  # a route outside the middleware's protection: refuse rather than serve anonymously
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
    return tenant  # type: ignore[no-any-return]


TenantDep = Annotated[Tenant, Depends(get_tenant)]


def get_generation_engine(request: Request) -> GenerationEngine:
    """The process's serving engine, created on first use (models load lazily inside it)."""
    state = request.app.state
    with state.engine_lock:
        if state.engine is None:
            settings: Settings = state.settings
            state.engine = GenerationEngine(
                models=state.models,
                placement=resolve_placement(settings.device, settings.dtype),
                storage=state.storage,
                cache_dir=settings.data_dir / "adapter-cache",
                limits=EngineLimits(
                    max_batch=settings.serving_max_batch,
                    max_waiting=settings.serving_max_waiting,
                    kv_cache_bytes=settings.serving_kv_cache_bytes,
                    max_adapters=settings.serving_max_adapters,
                    adapter_bytes=settings.serving_adapter_cache_bytes,
                    host_adapter_bytes=settings.serving_host_cache_bytes,
                    disk_adapter_bytes=settings.serving_disk_cache_bytes,
                ),
            )
        return state.engine  # type: ignore[no-any-return]


EngineDep = Annotated[GenerationEngine, Depends(get_generation_engine)]
