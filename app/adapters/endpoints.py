"""HTTP routes for adapters."""

from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import StreamingResponse

from app.adapters import service
from app.adapters.schemas import AdapterDeleted, AdapterObject
from app.core.deps import SessionDep, StorageDep, TenantDep
from app.core.errors import error_responses
from app.core.pagination import DEFAULT_LIMIT, AfterQuery, LimitQuery, ListPage

router = APIRouter(prefix="/adapters", tags=["adapters"], responses=error_responses(401, 404, 410, 422))

AdapterId = Annotated[str, Path(max_length=64, description="An adapter id (`adapter-…`)")]
ArtifactId = Annotated[
    str, Path(max_length=64, description="An adapter id (`adapter-…`) or a checkpoint id (`ftckpt-…`)")
]


@router.get("")
def list_adapters(
    session: SessionDep, tenant: TenantDep, limit: LimitQuery = DEFAULT_LIMIT, after: AfterQuery = None
) -> ListPage[AdapterObject]:
    rows, has_more = service.list_adapters(session, tenant_id=tenant.id, limit=limit, after=after)
    return ListPage(data=[AdapterObject.model_validate(a) for a in rows], has_more=has_more)


@router.get("/{adapter_id}")
def get_adapter(adapter_id: AdapterId, session: SessionDep, tenant: TenantDep) -> AdapterObject:
    return AdapterObject.model_validate(service.get_adapter(session, tenant_id=tenant.id, adapter_id=adapter_id))


@router.delete("/{adapter_id}")
def delete_adapter(
    adapter_id: AdapterId, session: SessionDep, storage: StorageDep, tenant: TenantDep
) -> AdapterDeleted:
    """Delete an adapter and its stored archive: it leaves the lists and stops counting against the tenant's
    stored bytes, and new requests for it are 404; a generation already running with it finishes first."""
    row = service.delete_adapter(session, storage=storage, tenant_id=tenant.id, adapter_id=adapter_id)
    return AdapterDeleted(id=row.id)


@router.get(
    "/{adapter_id}/download",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "A gzipped tar of the adapter folder",
            "content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
def download_adapter(
    adapter_id: ArtifactId, session: SessionDep, storage: StorageDep, tenant: TenantDep
) -> StreamingResponse:
    """A gzipped tar holding the artifact and `tuneforge.json` (its manifest): for PEFT methods (`format`
    `peft`) `adapter_config.json` and `adapter_model.safetensors`, which `peft.PeftModel.from_pretrained` loads;
    for weight-delta methods (`format` `delta`: head, layerwise, discriminative, full) `delta.safetensors` with
    `delta_config.json`, which name the base model and the sha256 of its weights.

    A job's checkpoint id (`ftckpt-…`) downloads the artifact as it was at that checkpoint.

    410 if the stored archive is missing or damaged; the body always has its full `Content-Length`.
    """
    row = service.get_servable(session, tenant_id=tenant.id, adapter_id=adapter_id)
    return StreamingResponse(
        service.open_artifact(storage, row),
        media_type="application/gzip",
        headers={
            "Content-Disposition": f'attachment; filename="{row.id}.tar.gz"',
            "Content-Length": str(row.size_bytes),
            "X-Content-SHA256": row.sha256,
        },
    )
