"""Tenants and their API keys: create, list, revoke, authenticate."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, func, or_, select, update
from sqlalchemy.orm import Session

from app.core.errors import Conflict, ErrorCode, InvalidInput, NotFound, Unauthorized
from app.core.ids import new_id
from app.core.models import ApiKey, Tenant, utcnow
from app.core.security import PREFIX_LENGTH, generate_api_key, hash_api_key

# `last_used_at` is written at most this often per key, so most requests only read.
LAST_USED_RESOLUTION = timedelta(minutes=1)
# Keys named in the error for an ambiguous prefix, at most.
AMBIGUOUS_LISTED = 10


@dataclass(frozen=True)
class ApiKeyInfo:
    """What may be shown about a key: never the key or its hash."""

    id: str
    prefix: str
    tenant: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class KeyAlreadyRevoked(Conflict):
    code = ErrorCode.key_already_revoked

    def __init__(self, key: ApiKeyInfo) -> None:
        when = f" at {key.revoked_at:%Y-%m-%d %H:%M:%S} UTC" if key.revoked_at else ""
        super().__init__(f"key {key.prefix} (tenant {key.tenant}) was already revoked{when}", param="prefix")
        self.key = key


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
    session.add(ApiKey(id=new_id("key"), tenant_id=tenant.id, key_hash=hash_api_key(key), prefix=key[:PREFIX_LENGTH]))
    session.flush()
    return key


def count_tenants(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Tenant)) or 0


def _key_infos(session: Session, *conditions: ColumnElement[bool]) -> list[ApiKeyInfo]:
    rows = session.execute(
        select(ApiKey, Tenant.name)
        .join(Tenant, Tenant.id == ApiKey.tenant_id)
        .where(*conditions)
        .order_by(ApiKey.created_at, ApiKey.id)
    ).all()
    return [
        ApiKeyInfo(key.id, key.prefix, tenant, key.created_at, key.last_used_at, key.revoked_at) for key, tenant in rows
    ]


def list_keys(session: Session, *, tenant_name: str | None = None) -> list[ApiKeyInfo]:
    """Every key (revoked ones too), oldest first; only TENANT_NAME's when given (NotFound if no such tenant)."""
    if tenant_name is None:
        return _key_infos(session)
    if session.scalar(select(Tenant.id).where(Tenant.name == tenant_name)) is None:
        raise NotFound(f"no tenant named {tenant_name!r}", param="tenant", code=ErrorCode.tenant_not_found)
    return _key_infos(session, Tenant.name == tenant_name)


def revoke_key(session: Session, *, prefix: str) -> ApiKeyInfo:
    """Revoke the one key whose prefix starts with PREFIX (an abbreviation is fine while it is unambiguous).

    Raises NotFound when no key matches, Conflict (listing them) when several do, and KeyAlreadyRevoked.
    """
    if not prefix:
        raise InvalidInput("give the key's prefix", param="prefix")
    # substr, not LIKE: prefixes contain '_' (a LIKE wildcard) and SQLite's LIKE ignores case.
    matches = _key_infos(session, func.substr(ApiKey.prefix, 1, len(prefix)) == prefix)
    # A whole prefix names its key even when it also starts a longer one (8-character prefixes of older keys).
    matches = [k for k in matches if k.prefix == prefix] or matches
    if not matches:
        raise NotFound(
            f"no API key has a prefix starting with {prefix!r}", param="prefix", code=ErrorCode.key_not_found
        )
    if len(matches) > 1:
        listed = ", ".join(f"{k.prefix} (tenant {k.tenant})" for k in matches[:AMBIGUOUS_LISTED])
        if len(matches) > AMBIGUOUS_LISTED:
            listed += f" and {len(matches) - AMBIGUOUS_LISTED} more"
        raise Conflict(
            f"{prefix!r} matches {len(matches)} keys: {listed}; give more of the prefix",
            param="prefix",
            code=ErrorCode.ambiguous_key_prefix,
        )
    key = matches[0]
    revoked_at = utcnow()
    revoked = session.execute(
        update(ApiKey).where(ApiKey.id == key.id, ApiKey.revoked_at.is_(None)).values(revoked_at=revoked_at)
    )
    if revoked.rowcount == 0:  # type: ignore[attr-defined]
        raise KeyAlreadyRevoked(key)
    return replace(key, revoked_at=revoked_at)


def authenticate(session: Session, *, authorization: str | None) -> Tenant:
    """The tenant of a valid, unrevoked key (read on every call: a revoked key fails on its next request).

    Also records when the key was last used, at most once per LAST_USED_RESOLUTION. That UPDATE holds a
    row lock (on SQLite, the database's write lock) until the caller commits, so call this in a short unit
    of work of its own.
    """
    if not authorization:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'", code=ErrorCode.missing_api_key)
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("malformed Authorization header: expected 'Bearer <key>'")
    row = session.execute(
        select(Tenant, ApiKey.id, ApiKey.last_used_at)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == hash_api_key(token.strip()), ApiKey.revoked_at.is_(None))
    ).one_or_none()
    if row is None:
        raise Unauthorized("invalid API key")
    tenant, key_id, last_used_at = row
    now = utcnow()
    stale = now - LAST_USED_RESOLUTION
    if last_used_at is None or last_used_at < stale:
        # Conditional, so that concurrent requests write it once.
        session.execute(
            update(ApiKey)
            .where(ApiKey.id == key_id, or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < stale))
            .values(last_used_at=now)
        )
    return tenant
