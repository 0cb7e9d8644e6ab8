"""HTTP routes for training files."""

import functools
from typing import Annotated

from fastapi import APIRouter, Path, Request, status
from starlette.concurrency import run_in_threadpool

from app.core.db import session_scope
from app.core.deps import SessionDep, SettingsDep, StorageDep, TenantDep, UploadSlotsDep
from app.core.errors import error_responses
from app.core.idempotency import IdempotencyKeyHeader
from app.core.models import File
from app.core.pagination import DEFAULT_LIMIT, AfterQuery, IdPage, LimitQuery
from app.core.settings import Settings
from app.core.usage import check_storage
from app.files import service
from app.files.schemas import UPLOAD_REQUEST_BODY, FileDeleted, FileObject
from app.files.upload import paced, receive_upload
from app.models.deps import ModelStoreDep

router = APIRouter(prefix="/v1/files", tags=["files"], responses=error_responses(401, 403, 404, 409, 413, 422))

FileId = Annotated[str, Path(max_length=64, description="A file id (`file-…`)")]


def _seen_or_room(settings: Settings, *, tenant_id: str, idempotency_key: str | None) -> File | None:
    """Before the body is read, in a short transaction of its own: the file this `Idempotency-Key` stored, if
    any; else a 403 for a tenant already at its storage limit."""
    with session_scope(settings.db_url) as session:
        if idempotency_key:
            seen = service.file_of_key(session, tenant_id=tenant_id, key=idempotency_key)
            if seen is not None:
                return seen
        check_storage(
            session,
            tenant_id=tenant_id,
            adding=1,
            limit=settings.max_stored_bytes_per_tenant,
            what="another file",
            lock=False,
        )
    return None


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    openapi_extra={"requestBody": UPLOAD_REQUEST_BODY},
    responses=error_responses(408, 429),
)
async def upload_file(
    request: Request,
    settings: SettingsDep,
    storage: StorageDep,
    models: ModelStoreDep,
    tenant: TenantDep,
    uploads: UploadSlotsDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> FileObject:
    """Upload a JSONL training file; every line is validated before it is stored (422 lists each bad line).

    Tokens are counted with the tokenizer of `base_model` (a form field; default: the service's default model).
    With an `Idempotency-Key` seen in the last 24 hours, the file that request stored is returned and the body is
    not read. A tenant has at most `TUNEFORGE_MAX_UPLOADS_PER_TENANT` uploads in progress (429 past it), and an
    upload that sends its body slower than `TUNEFORGE_UPLOAD_MIN_BYTES_PER_SECOND` is cut off (408). No database
    connection is held while the body is read.
    """
    seen = await run_in_threadpool(_seen_or_room, settings, tenant_id=tenant.id, idempotency_key=idempotency_key)
    if seen is not None:
        return FileObject.of(seen)
    with uploads.hold(tenant.id):
        body = paced(
            request.stream(),
            grace_seconds=settings.upload_grace_seconds,
            min_bytes_per_second=settings.upload_min_bytes_per_second,
        )
        received = await receive_upload(request.headers.get("content-type"), body, scratch_dir=settings.tmp_dir)
        try:
            if received.file is None:
                raise service.missing_file()
            service.check_form_fields(received.fields)
            row = await run_in_threadpool(
                functools.partial(
                    service.create_file,
                    settings=settings,
                    storage=storage,
                    models=models,
                    tenant_id=tenant.id,
                    filename=received.filename,
                    purpose=received.fields.get("purpose", "fine-tune"),
                    base_model=received.fields.get("base_model"),
                    fileobj=received.file,
                    idempotency_key=idempotency_key,
                )
            )
        finally:
            received.close()
    return FileObject.of(row)


@router.get("")
def list_files(
    session: SessionDep, tenant: TenantDep, limit: LimitQuery = DEFAULT_LIMIT, after: AfterQuery = None
) -> IdPage[FileObject]:
    rows, has_more = service.list_files(session, tenant_id=tenant.id, limit=limit, after=after)
    return IdPage[FileObject].of([FileObject.of(f) for f in rows], has_more=has_more)


@router.get("/{file_id}")
def get_file(file_id: FileId, session: SessionDep, tenant: TenantDep) -> FileObject:
    return FileObject.of(service.get_file(session, tenant_id=tenant.id, file_id=file_id))


@router.delete("/{file_id}")
def delete_file(file_id: FileId, session: SessionDep, storage: StorageDep, tenant: TenantDep) -> FileDeleted:
    """Delete a file; refused with 409 while a job that has not ended uses it."""
    row = service.delete_file(session, storage=storage, tenant_id=tenant.id, file_id=file_id)
    return FileDeleted(id=row.id)
