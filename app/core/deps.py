"""FastAPI dependencies of the core (settings, storage, the session, the tenant, metrics, per-tenant slots),
declared once as `Annotated` aliases; a domain declares its own next to it (app/models/deps.py,
app/inference/engine.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.core.concurrency import TenantSlots, TenantThreads
from app.core.db import session_scope
from app.core.errors import ErrorCode, Unauthorized
from app.core.metrics import Metrics
from app.core.models import Tenant
from app.core.settings import Settings
from app.core.storage import ObjectStorage


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def get_storage(request: Request) -> ObjectStorage:
    return request.app.state.storage  # type: ignore[no-any-return]


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics  # type: ignore[no-any-return]


def get_upload_slots(request: Request) -> TenantSlots:
    return request.app.state.uploads  # type: ignore[no-any-return]


def get_stream_slots(request: Request) -> TenantSlots:
    return request.app.state.streams  # type: ignore[no-any-return]


def get_tenant_threads(request: Request) -> TenantThreads:
    return request.app.state.tenant_threads  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
StorageDep = Annotated[ObjectStorage, Depends(get_storage)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
UploadSlotsDep = Annotated[TenantSlots, Depends(get_upload_slots)]  # each tenant's uploads in progress
StreamSlotsDep = Annotated[TenantSlots, Depends(get_stream_slots)]  # each tenant's open event streams
TenantThreadsDep = Annotated[TenantThreads, Depends(get_tenant_threads)]  # each tenant's threads for blocking work


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
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'", code=ErrorCode.missing_api_key)
    return tenant  # type: ignore[no-any-return]


TenantDep = Annotated[Tenant, Depends(get_tenant)]
