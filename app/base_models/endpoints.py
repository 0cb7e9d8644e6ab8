"""HTTP routes for base models (OpenAI's `/v1/models`): what jobs and /generate can use."""

from typing import Annotated

from fastapi import APIRouter, Path

from app.base_models import service
from app.base_models.schemas import ModelList, ModelObject
from app.core.deps import SessionDep, SettingsDep, TenantDep
from app.core.errors import error_responses

router = APIRouter(prefix="/v1/models", tags=["models"], responses=error_responses(401, 404))

ModelId = Annotated[str, Path(max_length=64, description="A base model id, e.g. `smollm2-135m-instruct`")]


@router.get("")
def list_models(session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> ModelList:
    """Every base model jobs can fine-tune: the built-ins, then those the operator registered."""
    records = service.list_models(session)
    return ModelList(data=[ModelObject.of(r, default_model=settings.default_base_model) for r in records])


@router.get("/{model_id}")
def get_model(model_id: ModelId, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> ModelObject:
    record = service.get_model(session, model_id=model_id)
    return ModelObject.of(record, default_model=settings.default_base_model)
