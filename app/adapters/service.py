"""Adapter lookups for the API."""

from sqlalchemy.orm import Session

from app.adapters import repository
from app.core.errors import NotFound
from app.core.models import Adapter


def get_adapter(session: Session, *, tenant_id: str, adapter_id: str, param: str = "adapter_id") -> Adapter:
    row = repository.get_adapter(session, tenant_id=tenant_id, adapter_id=adapter_id)
    if row is None:
        raise NotFound(f"no adapter with id {adapter_id!r}", param=param)
    return row


def list_adapters(session: Session, *, tenant_id: str) -> list[Adapter]:
    return repository.list_adapters(session, tenant_id=tenant_id)
