"""HTTP routes of evals (OpenAI's paths: the official client's `evals.*` and `evals.runs.*` call them)."""

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request, status

from app.core.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from app.core.errors import error_responses
from app.core.pagination import DEFAULT_LIMIT, AfterQuery, IdPage, LimitQuery
from app.evals import service
from app.evals.schemas import (
    EvalCreate,
    EvalDeleted,
    EvalObject,
    EvalUpdate,
    OutputItemObject,
    RunCreate,
    RunDeleted,
    RunObject,
)

router = APIRouter(prefix="/v1", tags=["evals"], responses=error_responses(401, 404, 422, 503))

EvalId = Annotated[str, Path(max_length=64, description="An eval's id (`eval-…`)")]
RunId = Annotated[str, Path(max_length=64, description="A run's id (`evalrun-…`)")]
ItemId = Annotated[str, Path(max_length=64, description="An output item's id (`outputitem-…`)")]
OrderQuery = Annotated[Literal["asc", "desc"], Query(description="Oldest first (asc, the default) or newest first")]


@router.post("/evals", status_code=status.HTTP_201_CREATED)
def create_eval(body: EvalCreate, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> EvalObject:
    """An eval: the JSON schema of its data items and its testing criteria (graders). Grader types:
    `string_check`, `text_similarity`, `score_model`, `label_model` (the judge: any model Tuneforge serves) and
    `json_schema` (Tuneforge's own); `python` and `multi` are refused."""
    row = service.create_eval(session, settings=settings, tenant_id=tenant.id, body=body)
    return service.eval_object(row)


@router.get("/evals")
def list_evals(
    session: SessionDep,
    tenant: TenantDep,
    limit: LimitQuery = DEFAULT_LIMIT,
    after: AfterQuery = None,
    order: OrderQuery = "asc",
    order_by: Annotated[Literal["created_at"], Query(description="Only `created_at`")] = "created_at",
) -> IdPage[EvalObject]:
    rows, has_more = service.list_evals(
        session, tenant_id=tenant.id, limit=limit, after=after, ascending=order == "asc"
    )
    return IdPage.of([service.eval_object(row) for row in rows], has_more=has_more)  # type: ignore[return-value]


@router.get("/evals/{eval_id}")
def get_eval(eval_id: EvalId, session: SessionDep, tenant: TenantDep) -> EvalObject:
    return service.eval_object(service.get_eval(session, tenant_id=tenant.id, eval_id=eval_id))


@router.post("/evals/{eval_id}")
def update_eval(eval_id: EvalId, body: EvalUpdate, session: SessionDep, tenant: TenantDep) -> EvalObject:
    """Rename the eval or replace its metadata."""
    return service.eval_object(service.update_eval(session, tenant_id=tenant.id, eval_id=eval_id, body=body))


@router.delete("/evals/{eval_id}")
def delete_eval(eval_id: EvalId, session: SessionDep, tenant: TenantDep) -> EvalDeleted:
    """Delete the eval, its runs and their output items."""
    return EvalDeleted(eval_id=service.delete_eval(session, tenant_id=tenant.id, eval_id=eval_id))


@router.post("/evals/{eval_id}/runs", status_code=status.HTTP_201_CREATED)
def create_run(
    eval_id: EvalId,
    body: RunCreate,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    tenant: TenantDep,
) -> RunObject:
    """Run the eval: a `completions` data source (items inline or in a file uploaded with purpose `evals`,
    `input_messages` rendered per item, answered by `model`: a base model, an adapter or checkpoint id, or an
    adapter's name), or a `jsonl` one (items that hold their answers). Every item is checked against the eval's
    item schema before the run is queued; the run executes on the serving engine of an API process."""
    run = service.create_run(
        session, settings=settings, storage=storage, tenant_id=tenant.id, eval_id=eval_id, body=body
    )
    answer = service.run_object(session, run)
    session.commit()  # before the runner looks
    runner = getattr(request.app.state, "eval_runner", None)
    if runner is not None:
        runner.wake()
    return answer


@router.get("/evals/{eval_id}/runs")
def list_runs(
    eval_id: EvalId,
    session: SessionDep,
    tenant: TenantDep,
    limit: LimitQuery = DEFAULT_LIMIT,
    after: AfterQuery = None,
    order: OrderQuery = "asc",
    status: Annotated[
        Literal["queued", "in_progress", "completed", "canceled", "failed"] | None, Query(description="Only these")
    ] = None,
) -> IdPage[RunObject]:
    rows, has_more = service.list_runs(
        session, tenant_id=tenant.id, eval_id=eval_id, status=status, limit=limit, after=after, ascending=order == "asc"
    )
    return IdPage.of([service.run_object(session, run) for run in rows], has_more=has_more)  # type: ignore[return-value]


@router.get("/evals/{eval_id}/runs/{run_id}")
def get_run(eval_id: EvalId, run_id: RunId, session: SessionDep, tenant: TenantDep) -> RunObject:
    run = service.get_run(session, tenant_id=tenant.id, eval_id=eval_id, run_id=run_id)
    return service.run_object(session, run)


@router.post("/evals/{eval_id}/runs/{run_id}", responses=error_responses(409))
@router.post("/evals/{eval_id}/runs/{run_id}/cancel", responses=error_responses(409))
def cancel_run(eval_id: EvalId, run_id: RunId, session: SessionDep, tenant: TenantDep) -> RunObject:
    """Cancel a queued or running run (409 `run_not_cancellable` once it has ended); the items answered so far
    are kept."""
    run = service.cancel_run(session, tenant_id=tenant.id, eval_id=eval_id, run_id=run_id)
    return service.run_object(session, run)


@router.delete("/evals/{eval_id}/runs/{run_id}")
def delete_run(eval_id: EvalId, run_id: RunId, session: SessionDep, tenant: TenantDep) -> RunDeleted:
    return RunDeleted(run_id=service.delete_run(session, tenant_id=tenant.id, eval_id=eval_id, run_id=run_id))


@router.get("/evals/{eval_id}/runs/{run_id}/output_items")
def list_output_items(
    eval_id: EvalId,
    run_id: RunId,
    session: SessionDep,
    tenant: TenantDep,
    limit: LimitQuery = DEFAULT_LIMIT,
    after: AfterQuery = None,
    order: OrderQuery = "asc",
    status: Annotated[Literal["pass", "fail", "error"] | None, Query(description="Only these")] = None,
) -> IdPage[OutputItemObject]:
    """The run's items answered and graded so far, in the data's order."""
    run, rows, has_more = service.list_output_items(
        session,
        tenant_id=tenant.id,
        eval_id=eval_id,
        run_id=run_id,
        status=status,
        limit=limit,
        after=after,
        ascending=order == "asc",
    )
    return IdPage.of([service.output_item_object(run, row) for row in rows], has_more=has_more)  # type: ignore[return-value]


@router.get("/evals/{eval_id}/runs/{run_id}/output_items/{output_item_id}")
def get_output_item(
    eval_id: EvalId, run_id: RunId, output_item_id: ItemId, session: SessionDep, tenant: TenantDep
) -> OutputItemObject:
    run, row = service.get_output_item(
        session, tenant_id=tenant.id, eval_id=eval_id, run_id=run_id, item_id=output_item_id
    )
    return service.output_item_object(run, row)
