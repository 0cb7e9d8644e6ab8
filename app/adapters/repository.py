"""Queries on adapters; every one is scoped to a tenant."""

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.models import Adapter


def get_adapter(session: Session, *, tenant_id: str, adapter_id: str) -> Adapter | None:
    return session.scalar(select(Adapter).where(Adapter.id == adapter_id, Adapter.tenant_id == tenant_id))


def list_adapters(session: Session, *, tenant_id: str) -> list[Adapter]:
    return list(
        session.scalars(
            select(Adapter).where(Adapter.tenant_id == tenant_id).order_by(Adapter.created_at.desc(), Adapter.id.desc())
        )
    )
