"""HTTP routes for adapters."""

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from app.adapters import service
from app.adapters.schemas import AdapterList, AdapterObject
from app.core.deps import SessionDep, StorageDep, TenantDep

router = APIRouter(prefix="/adapters", tags=["adapters"])


@router.get("")
def list_adapters(session: SessionDep, tenant: TenantDep) -> AdapterList:
    return AdapterList(data=[AdapterObject.of(a) for a in service.list_adapters(session, tenant_id=tenant.id)])


@router.get("/{adapter_id}")
def get_adapter(adapter_id: str, session: SessionDep, tenant: TenantDep) -> AdapterObject:
    return AdapterObject.of(service.get_adapter(session, tenant_id=tenant.id, adapter_id=adapter_id))


@router.get("/{adapter_id}/download")
def download_adapter(adapter_id: str, session: SessionDep, storage: StorageDep, tenant: TenantDep) -> StreamingResponse:
    """A gzipped tar holding `adapter_config.json`, `adapter_model.safetensors` and `tuneforge.json`."""
    row = service.get_adapter(session, tenant_id=tenant.id, adapter_id=adapter_id)
    return StreamingResponse(
        storage.iter_bytes(row.storage_key),
        media_type="application/gzip",
        headers={
            "Content-Disposition": f'attachment; filename="{row.id}.tar.gz"',
            "Content-Length": str(row.size_bytes),
            "X-Content-SHA256": row.sha256,
        },
    )
