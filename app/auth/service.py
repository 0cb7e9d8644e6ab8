"""Tenants and their API keys: create, authenticate."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.errors import Unauthorized
from app.core.ids import new_id
from app.core.models import ApiKey, Tenant
from app.core.security import generate_api_key, hash_api_key


def get_or_create_tenant(session: Session, *, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(id=new_id("tenant"), name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_api_key(session: Session, *, tenant_name: str) -> str:
    """Create (or reuse) the tenant and a new key for it; returns the key, which is never stored."""
    tenant = get_or_create_tenant(session, name=tenant_name)
    key = generate_api_key()
    session.add(ApiKey(id=new_id("key"), tenant_id=tenant.id, key_hash=hash_api_key(key), prefix=key[:8]))
    session.flush()
    return key


def count_tenants(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Tenant)) or 0


def authenticate(session: Session, *, authorization: str | None) -> Tenant:
    if not authorization:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("malformed Authorization header: expected 'Bearer <key>'")
    row = session.execute(
        select(Tenant)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == hash_api_key(token.strip()), ApiKey.revoked_at.is_(None))
    ).scalar_one_or_none()
    if row is None:
        raise Unauthorized("invalid API key")
    return row
