"""HTTP routes for base models (OpenAI's `/v1/models`): what jobs and /generate can use."""

from typing import Annotated

from fastapi import APIRouter, Path

from app.adapters.service import delete_adapter, get_adapter
from app.core.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from app.core.errors import ErrorBody, ErrorCode, Forbidden, error_responses
from app.core.models import Adapter
from app.core.pagination import ListObject
from app.models import service
from app.models.schemas import AdapterModelObject, ModelDeleted, ModelObject

router = APIRouter(prefix="/v1/models", tags=["models"], responses=error_responses(401, 404))

ModelId = Annotated[
    str, Path(max_length=64, description="A base model id, e.g. `smollm2-135m-instruct`, or an adapter id")
]


@router.get("")
def list_models(
    session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> ListObject[ModelObject | AdapterModelObject]:
    """Every base model jobs can fine-tune (the built-ins, then those the operator registered), then the tenant's
    adapters, newest first (at most 1000; GET /adapters pages through all of them)."""
    records = service.list_models(session)
    data: list[ModelObject | AdapterModelObject] = [
        ModelObject.of(r, default_model=settings.default_base_model) for r in records
    ]
    data += [_adapter(a) for a in service.list_adapter_models(session, tenant_id=tenant.id)]
    return ListObject(data=data)


@router.get("/{model_id}")
def get_model(
    model_id: ModelId, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> ModelObject | AdapterModelObject:
    """A base model, or one of the tenant's adapters (by id)."""
    if model_id.startswith("adapter-"):
        return _adapter(get_adapter(session, tenant_id=tenant.id, adapter_id=model_id, param="model_id"))
    record = service.get_model(session, model_id=model_id)
    return ModelObject.of(record, default_model=settings.default_base_model)


@router.delete(
    "/{model_id}",
    responses={403: {"model": ErrorBody, "description": "A base model: the operator's (`tuneforge models remove`)"}},
)
def delete_model(model_id: ModelId, session: SessionDep, storage: StorageDep, tenant: TenantDep) -> ModelDeleted:
    """OpenAI's "delete a fine-tuned model": deletes one of the tenant's adapters (by id) and its stored archive,
    as `DELETE /adapters/{id}` does; a generation already running with it finishes first. A base model is 403."""
    if model_id.startswith("adapter-"):
        row = delete_adapter(session, storage=storage, tenant_id=tenant.id, adapter_id=model_id, param="model")
        return ModelDeleted(id=row.id)
    service.get_model(session, model_id=model_id)  # 404 model_not_found for no model at all
    raise Forbidden(
        f"{model_id} is a base model: only the operator can remove it (`tuneforge models remove`); a fine-tuned "
        "model (an adapter id) can be deleted",
        param="model",
        code=ErrorCode.model_not_deletable,
    )


def _adapter(adapter: Adapter) -> AdapterModelObject:
    return AdapterModelObject(
        id=adapter.id,
        created=int(adapter.created_at.timestamp()),
        owned_by=adapter.tenant_id,
        parent=adapter.base_model,
        method=adapter.method,
        name=adapter.name,
    )
