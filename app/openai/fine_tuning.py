"""HTTP routes of OpenAI's fine-tuning API (`/v1/fine_tuning/jobs…`), over the same job service as `/jobs`."""

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, status

from app.core.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from app.core.errors import AppError, ErrorCode, InvalidInput, error_responses
from app.core.idempotency import IdempotencyKeyHeader
from app.core.pagination import AfterQuery, ListPage
from app.jobs import service
from app.models.deps import ModelStoreDep
from app.openai import fine_tuning_service as openai
from app.openai.fine_tuning_schemas import (
    FineTuningCheckpointList,
    FineTuningEvent,
    FineTuningJob,
    FineTuningJobCreate,
)

router = APIRouter(
    prefix="/v1/fine_tuning/jobs",
    tags=["openai-compatible fine-tuning"],
    responses=error_responses(401, 404, 409, 413, 422, 429, 503),
)

JobId = Annotated[str, Path(max_length=64, description="A job id (`ftjob-…`)")]
Limit = Annotated[int, Query(ge=1, le=100, description="How many items to return (1-100)")]


@router.post("", status_code=status.HTTP_200_OK)
def create_fine_tuning_job(
    body: FineTuningJobCreate,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    models: ModelStoreDep,
    tenant: TenantDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> FineTuningJob:
    """Create a job as OpenAI's API does (200 with the job object); `fine_tuned_model` is the adapter id once it
    has succeeded."""
    try:
        job = service.submit_job(
            session,
            settings=settings,
            storage=storage,
            models=models,
            tenant_id=tenant.id,
            spec=openai.job_spec(body),
            idempotency_key=idempotency_key,
            endpoint="fine_tuning.jobs",
        )
    except AppError as exc:
        raise openai.in_openai_terms(exc, body) from None
    return openai.job_object(job)


@router.get("")
def list_fine_tuning_jobs(
    request: Request, session: SessionDep, tenant: TenantDep, limit: Limit = 20, after: AfterQuery = None
) -> ListPage[FineTuningJob]:
    if any(name.startswith("metadata") for name in request.query_params):
        raise InvalidInput("metadata: filtering jobs by metadata is not supported yet", param="metadata")
    rows, has_more = service.list_jobs(session, tenant_id=tenant.id, limit=limit, after=after)
    return ListPage(data=[openai.job_object(job) for job in rows], has_more=has_more)


@router.get("/{job_id}")
def retrieve_fine_tuning_job(job_id: JobId, session: SessionDep, tenant: TenantDep) -> FineTuningJob:
    return openai.job_object(service.get_job(session, tenant_id=tenant.id, job_id=job_id))


@router.post("/{job_id}/cancel")
def cancel_fine_tuning_job(job_id: JobId, session: SessionDep, storage: StorageDep, tenant: TenantDep) -> FineTuningJob:
    return openai.job_object(service.cancel_job(session, storage=storage, tenant_id=tenant.id, job_id=job_id))


@router.post("/{job_id}/pause")
def pause_fine_tuning_job(job_id: JobId, session: SessionDep, tenant: TenantDep) -> FineTuningJob:
    return openai.job_object(service.pause_job(session, tenant_id=tenant.id, job_id=job_id))


@router.post("/{job_id}/resume")
def resume_fine_tuning_job(
    job_id: JobId, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> FineTuningJob:
    return openai.job_object(service.resume_job(session, settings=settings, tenant_id=tenant.id, job_id=job_id))


@router.get("/{job_id}/events")
def list_fine_tuning_events(
    job_id: JobId, session: SessionDep, tenant: TenantDep, limit: Limit = 20, after: AfterQuery = None
) -> ListPage[FineTuningEvent]:
    """The job's events, latest first (OpenAI's order); `after` an event id continues with the older ones. Metric
    events carry OpenAI's metric names beside Tuneforge's."""
    job = service.get_job(session, tenant_id=tenant.id, job_id=job_id)
    rows, has_more = service.list_events_newest_first(
        session, tenant_id=tenant.id, job_id=job.id, after_seq=openai.event_seq(job.id, after), limit=limit
    )
    return ListPage(data=[openai.event_object(job, e) for e in rows], has_more=has_more)


@router.get("/{job_id}/checkpoints")
def list_fine_tuning_checkpoints(
    job_id: JobId, session: SessionDep, tenant: TenantDep, limit: Limit = 10, after: AfterQuery = None
) -> FineTuningCheckpointList:
    """The job's kept checkpoints, latest step first; each one's id is a `model` for `/v1/chat/completions`."""
    rows = service.list_checkpoints(session, tenant_id=tenant.id, job_id=job_id)
    if after is not None:
        ids = [row.id for row in rows]
        if after not in ids:
            raise InvalidInput(
                "after: no checkpoint of this job with that id", param="after", code=ErrorCode.invalid_cursor
            )
        rows = rows[ids.index(after) + 1 :]
    page = [openai.checkpoint_object(row) for row in rows[:limit]]
    return FineTuningCheckpointList(
        data=page,
        has_more=len(rows) > limit,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
    )
