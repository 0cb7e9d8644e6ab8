"""HTTP routes for fine-tuning jobs."""

import functools
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, status
from fastapi.responses import JSONResponse

from app.core.deps import SessionDep, SettingsDep, StorageDep, StreamSlotsDep, TenantDep, TenantThreadsDep
from app.core.errors import error_responses
from app.core.idempotency import IdempotencyKeyHeader
from app.core.pagination import DEFAULT_LIMIT, AfterQuery, LimitQuery, ListPage
from app.core.security import hash_api_key
from app.core.sse import event_source_response
from app.jobs import planning, service
from app.jobs.schemas import (
    CheckpointDeleted,
    CheckpointList,
    CheckpointObject,
    DryRunObject,
    EventObject,
    JobCreate,
    JobDeleted,
    JobObject,
    MetricsObject,
)
from app.jobs.streaming import event_stream, released_after
from app.models.deps import ModelStoreDep

router = APIRouter(prefix="/jobs", tags=["jobs"], responses=error_responses(401, 403, 404, 409, 413, 422, 429, 503))

JobId = Annotated[str, Path(max_length=64, description="A job id (`ftjob-…`)")]
CheckpointId = Annotated[str, Path(max_length=64, description="A checkpoint id (`ftckpt-…`)")]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobObject,
    responses={200: {"model": DryRunObject, "description": "`dry_run`: the plan; nothing is created or queued"}},
)
def create_job(
    body: JobCreate,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    models: ModelStoreDep,
    tenant: TenantDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JobObject | JSONResponse:
    spec = body.spec()
    if body.dry_run:  # every check, nothing created: no limit, no key, nothing queued
        plan = planning.planned_outside(
            session,
            storage=storage,
            models=models,
            attempt=lambda: planning.plan_job(
                session,
                tenant_id=tenant.id,
                request=spec,
                default_base_model=settings.default_base_model,
                max_batch_tokens=settings.train_max_batch_tokens,
                cuda_training=planning.cuda_training(settings),
            ),
        )
        return JSONResponse(
            DryRunObject(**planning.dry_run(session, plan, tenant_id=tenant.id)).model_dump(), status_code=200
        )
    job = service.submit_job(
        session,
        settings=settings,
        storage=storage,
        models=models,
        tenant_id=tenant.id,
        spec=spec,
        idempotency_key=idempotency_key,
    )
    return JobObject.of(job)


@router.get("")
def list_jobs(
    session: SessionDep,
    tenant: TenantDep,
    limit: LimitQuery = DEFAULT_LIMIT,
    after: AfterQuery = None,
) -> ListPage[JobObject]:
    rows, has_more = service.list_jobs(session, tenant_id=tenant.id, limit=limit, after=after)
    return ListPage(data=[JobObject.of(j) for j in rows], has_more=has_more)


@router.get("/{job_id}")
def get_job(job_id: JobId, session: SessionDep, tenant: TenantDep) -> JobObject:
    return JobObject.of(service.get_job(session, tenant_id=tenant.id, job_id=job_id))


@router.delete("/{job_id}")
def delete_job(job_id: JobId, session: SessionDep, storage: StorageDep, tenant: TenantDep) -> JobDeleted:
    """Delete a job that has ended (409 `job_not_ended` otherwise: cancel it first) with its events, checkpoints
    and adapter, their stored files too; its training files stay. It stops counting against the tenant's stored
    bytes; a generation already running with its adapter finishes first."""
    job = service.delete_job(session, storage=storage, tenant_id=tenant.id, job_id=job_id)
    return JobDeleted(id=job.id)


@router.post("/{job_id}/cancel")
def cancel_job(job_id: JobId, session: SessionDep, storage: StorageDep, tenant: TenantDep) -> JobObject:
    return JobObject.of(service.cancel_job(session, storage=storage, tenant_id=tenant.id, job_id=job_id))


@router.post("/{job_id}/pause")
def pause_job(job_id: JobId, session: SessionDep, tenant: TenantDep) -> JobObject:
    """Pause a queued job at once, or a running one after its current step (its worker checkpoints it and moves
    on to the next job; `running` until then). 409 `job_not_pausable` for a job that has ended."""
    return JobObject.of(service.pause_job(session, tenant_id=tenant.id, job_id=job_id))


@router.post("/{job_id}/resume")
def resume_job(job_id: JobId, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> JobObject:
    """Queue a paused job again: it continues from the checkpoint it paused at. 409 `job_not_paused` otherwise."""
    return JobObject.of(service.resume_job(session, settings=settings, tenant_id=tenant.id, job_id=job_id))


@router.get(
    "/{job_id}/events",
    response_model=ListPage[EventObject],
    responses={
        200: {
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
            "description": "The events (JSON, paginated), or with `Accept: text/event-stream` or `stream=true` a "
            "server-sent event stream: `id` the seq, `event` the type, `data` the event object",
        }
    },
)
def list_events(
    job_id: JobId,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    streams: StreamSlotsDep,
    threads: TenantThreadsDep,
    after: Annotated[int, Query(ge=0, le=2**31 - 1, description="Return events with seq greater than this")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    stream: Annotated[
        bool, Query(description="Stream new events as server-sent events until the job ends (as Accept does)")
    ] = False,
    last_event_id: Annotated[
        int | None,
        Header(ge=0, le=2**31 - 1, description="Streaming: resume after this seq (what a reconnecting client sends)"),
    ] = None,
) -> Any:
    if stream or "text/event-stream" in request.headers.get("accept", ""):
        job = service.get_job(session, tenant_id=tenant.id, job_id=job_id)  # 404 before the stream starts
        slot = streams.acquire(tenant.id)  # 429 past the tenant's open streams
        start = last_event_id if last_event_id is not None else after
        token = request.headers.get("authorization", "").partition(" ")[2].strip()  # checked by the middleware
        events = event_stream(
            settings.db_url,
            job.id,
            start,
            request.is_disconnected,
            key_hash=hash_api_key(token),
            poll=functools.partial(threads.run, tenant.id),  # the tenant's threads: its many streams wait on them
        )
        return event_source_response(released_after(events, slot))
    rows, has_more = service.list_events(session, tenant_id=tenant.id, job_id=job_id, after_seq=after, limit=limit)
    return ListPage(data=[EventObject.model_validate(e) for e in rows], has_more=has_more)


@router.get("/{job_id}/metrics")
def job_metrics(
    job_id: JobId,
    session: SessionDep,
    tenant: TenantDep,
    max_points: Annotated[
        int, Query(ge=2, le=10_000, description="At most this many points per curve (evenly thinned, last kept)")
    ] = 1000,
) -> MetricsObject:
    """The training and validation curves as (step, value) pairs, for a plot."""
    job = service.get_job(session, tenant_id=tenant.id, job_id=job_id)
    return MetricsObject(job_id=job.id, curves=service.metric_curves(session, job_id=job.id, max_points=max_points))


@router.get("/{job_id}/checkpoints")
def list_checkpoints(job_id: JobId, session: SessionDep, tenant: TenantDep) -> CheckpointList:
    """The job's kept checkpoints (its latest `keep_checkpoints`), latest step first. Each one is saved every
    `checkpoint_every` steps and at each epoch end; `/generate` takes its id as `adapter_id`, and
    `GET /adapters/{id}/download` downloads it. A job that a crash or a stopped worker interrupted resumes from
    the latest."""
    rows = service.list_checkpoints(session, tenant_id=tenant.id, job_id=job_id)
    return CheckpointList(data=[CheckpointObject.of(row) for row in rows])


@router.delete("/{job_id}/checkpoints/{checkpoint_id}")
def delete_checkpoint(
    job_id: JobId, checkpoint_id: CheckpointId, session: SessionDep, storage: StorageDep, tenant: TenantDep
) -> CheckpointDeleted:
    """Delete one of the job's checkpoints and its stored files (at any time: a running job that is interrupted
    then resumes from an earlier one)."""
    row = service.delete_checkpoint(
        session, storage=storage, tenant_id=tenant.id, job_id=job_id, checkpoint_id=checkpoint_id
    )
    return CheckpointDeleted(id=row.id)
