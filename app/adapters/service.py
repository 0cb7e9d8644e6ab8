"""Adapter lookups for the API, access to their stored artifacts, and their deletion."""

from collections.abc import Iterator

from sqlalchemy.orm import Session

from app.adapters import repository
from app.core.errors import ErrorCode, Gone, NotFound, clip
from app.core.models import Adapter, Checkpoint
from app.core.pagination import cursor_row
from app.core.storage import ObjectStorage, delete_after_commit


def get_adapter(session: Session, *, tenant_id: str, adapter_id: str, param: str = "adapter_id") -> Adapter:
    row = repository.get_adapter(session, tenant_id=tenant_id, adapter_id=adapter_id)
    if row is None:
        raise NotFound(f"no adapter with id {clip(adapter_id)}", param=param)
    return row


CHECKPOINT_PREFIX = "ftckpt-"


def get_servable(
    session: Session, *, tenant_id: str, adapter_id: str, param: str = "adapter_id"
) -> Adapter | Checkpoint:
    """An adapter, or a job's checkpoint (`ftckpt-…`): both are served and downloaded the same way."""
    if not adapter_id.startswith(CHECKPOINT_PREFIX):
        return get_adapter(session, tenant_id=tenant_id, adapter_id=adapter_id, param=param)
    row = repository.get_checkpoint(session, tenant_id=tenant_id, checkpoint_id=adapter_id)
    if row is None:
        raise NotFound(f"no checkpoint with id {clip(adapter_id)} (a job keeps its latest ones)", param=param)
    return row


def list_adapters(session: Session, *, tenant_id: str, limit: int, after: str | None) -> tuple[list[Adapter], bool]:
    cursor = cursor_row(after, lambda id_: repository.get_adapter(session, tenant_id=tenant_id, adapter_id=id_))
    return repository.list_adapters(session, tenant_id=tenant_id, limit=limit, after=cursor)


def adapter_unavailable(adapter_id: str, reason: str, param: str = "adapter_id") -> Gone:
    return Gone(
        f"adapter {adapter_id} cannot be used: {reason}; train it again, or ask the operator to restore it",
        param=param,
        code=ErrorCode.adapter_unavailable,
    )


def open_artifact(storage: ObjectStorage, adapter: Adapter | Checkpoint) -> Iterator[bytes]:
    """The stored archive's bytes; refused before any is sent if the object is missing or has the wrong size."""
    try:
        size, chunks = storage.open(adapter.storage_key)
    except FileNotFoundError:
        raise adapter_unavailable(adapter.id, "its stored files are missing") from None
    if size != adapter.size_bytes:
        raise adapter_unavailable(adapter.id, "its stored files are damaged (wrong size)")
    return chunks


def delete_adapter(
    session: Session, *, storage: ObjectStorage, tenant_id: str, adapter_id: str, param: str = "adapter_id"
) -> Adapter:
    """Delete the adapter: its row now (it leaves the lists and the tenant's stored bytes, and new requests for it
    are 404), its archive once that is committed. Its job keeps its record of it (`adapter_id`). A generation
    already running with it finishes: the serving engine holds what it applies in memory."""
    row = repository.delete_adapter(session, tenant_id=tenant_id, adapter_id=adapter_id)
    if row is None:
        raise NotFound(f"no adapter with id {clip(adapter_id)}", param=param)
    delete_after_commit(session, storage, [row.storage_key], what=f"adapter {row.id}")
    return row
