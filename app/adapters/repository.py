"""Queries on adapters; every one is scoped to a tenant."""

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.core.models import Adapter, Checkpoint
from app.core.pagination import newest_first


def get_adapter(session: Session, *, tenant_id: str, adapter_id: str) -> Adapter | None:
    return session.scalar(select(Adapter).where(Adapter.id == adapter_id, Adapter.tenant_id == tenant_id))


def list_adapters(session: Session, *, tenant_id: str, limit: int, after: Adapter | None) -> tuple[list[Adapter], bool]:
    query = select(Adapter).where(Adapter.tenant_id == tenant_id)
    return newest_first(session, query, Adapter, limit=limit, after=after)


def get_checkpoint(session: Session, *, tenant_id: str, checkpoint_id: str) -> Checkpoint | None:
    return session.scalar(select(Checkpoint).where(Checkpoint.id == checkpoint_id, Checkpoint.tenant_id == tenant_id))


def delete_adapter(session: Session, *, tenant_id: str, adapter_id: str) -> Adapter | None:
    """Delete the tenant's adapter row; the row as it was (None if there was none). One statement, so that two
    concurrent deletions do not both believe they deleted it."""
    query = delete(Adapter).where(Adapter.id == adapter_id, Adapter.tenant_id == tenant_id).returning(Adapter)
    return session.scalars(query).one_or_none()
