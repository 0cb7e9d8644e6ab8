"""HTTP route for text generation."""

from fastapi import APIRouter

from app.core.deps import EngineDep, ModelStoreDep, SessionDep, SettingsDep, TenantDep
from app.core.errors import error_responses
from app.generation import service
from app.generation.schemas import GenerateRequest, GenerateResponse

router = APIRouter(tags=["generation"], responses=error_responses(401, 404, 410, 413, 422, 503))


@router.post("/generate")
def generate(
    body: GenerateRequest,
    session: SessionDep,
    settings: SettingsDep,
    models: ModelStoreDep,
    engine: EngineDep,
    tenant: TenantDep,
) -> GenerateResponse:
    return service.generate(session, settings=settings, models=models, engine=engine, tenant_id=tenant.id, request=body)
