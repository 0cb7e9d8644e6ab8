"""HTTP routes of sweeps (native API)."""

from typing import Annotated

from fastapi import APIRouter, Path, Request, status

from app.core.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from app.core.errors import error_responses
from app.core.pagination import DEFAULT_LIMIT, AfterQuery, LimitQuery, ListPage
from app.models.deps import ModelStoreDep
from app.sweeps import service
from app.sweeps.schemas import SweepCreate, SweepObject

router = APIRouter(tags=["sweeps"], responses=error_responses(401, 404, 422, 503))

SweepId = Annotated[str, Path(max_length=64, description="A sweep's id (`sweep-…`)")]


@router.post("/sweeps", status_code=status.HTTP_201_CREATED, responses=error_responses(409, 429))
def create_sweep(
    body: SweepCreate,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    models: ModelStoreDep,
    tenant: TenantDep,
) -> SweepObject:
    """Train several configurations (a list, or a grid of methods × hyperparameter values) of one training file,
    each an ordinary job (listed, cancellable, its adapter usable), rank them by validation loss, and stop those
    clearly behind at shared rungs (asynchronous successive halving). Every configuration is checked as `POST /jobs`
    checks a job before anything is created."""
    sweep = service.create_sweep(
        session, settings=settings, storage=storage, models=models, tenant_id=tenant.id, body=body
    )
    answer = service.sweep_object(session, sweep)
    session.commit()
    controller = getattr(request.app.state, "sweep_controller", None)
    if controller is not None:
        controller.wake()
    return answer


@router.get("/sweeps")
def list_sweeps(
    session: SessionDep, tenant: TenantDep, limit: LimitQuery = DEFAULT_LIMIT, after: AfterQuery = None
) -> ListPage[SweepObject]:
    rows, has_more = service.list_sweeps(session, tenant_id=tenant.id, limit=limit, after=after)
    return ListPage(data=[service.sweep_object(session, row) for row in rows], has_more=has_more)


@router.get("/sweeps/{sweep_id}")
def get_sweep(sweep_id: SweepId, session: SessionDep, tenant: TenantDep) -> SweepObject:
    """The sweep and its table: one result per configuration, best first (`rank`), with its objective, whether it
    was stopped early, its steps, trainable parameters, peak memory, tokens/s, wall time and adapter; `winner`
    once it has ended; `savings`: the steps elimination saved."""
    return service.sweep_object(session, service.get_sweep(session, tenant_id=tenant.id, sweep_id=sweep_id))


@router.post("/sweeps/{sweep_id}/cancel", responses=error_responses(409))
def cancel_sweep(sweep_id: SweepId, session: SessionDep, storage: StorageDep, tenant: TenantDep) -> SweepObject:
    """Start no more configurations and cancel the running ones' jobs; what ended keeps its results."""
    sweep = service.cancel_sweep(session, storage=storage, tenant_id=tenant.id, sweep_id=sweep_id)
    return service.sweep_object(session, sweep)
