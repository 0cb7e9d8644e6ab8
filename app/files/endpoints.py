"""HTTP routes for training files."""

from typing import Annotated

from fastapi import APIRouter, Path, Request, status
from starlette.concurrency import run_in_threadpool

from app.core import idempotency
from app.core.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from app.core.errors import error_responses
from app.core.idempotency import IdempotencyKeyHeader
from app.core.pagination import DEFAULT_LIMIT, AfterQuery, LimitQuery, ListPage
from app.core.usage import check_storage
from app.files import service
from app.files.schemas import UPLOAD_REQUEST_BODY, FileDeleted, FileObject
from app.files.upload import receive_upload
from app.models.deps import ModelStoreDep

router = APIRouter(prefix="/v1/files", tags=["files"], responses=error_responses(401, 403, 404, 409, 413, 422))

FileId = Annotated[str, Path(max_length=64, description="A file id (`file-…`)")]


@router.post("", status_code=status.HTTP_201_CREATED, openapi_extra={"requestBody": UPLOAD_REQUEST_BODY})
async def upload_file(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    models: ModelStoreDep,
    tenant: TenantDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> FileObject:
    """Upload a JSONL training file; every line is validated before it is stored (422 lists each bad line).

    Tokens are counted with the tokenizer of `base_model` (a form field; default: the service's default model).
    With an `Idempotency-Key` seen in the last 24 hours, the file that request stored is returned and the body is
    not read.
    """
    if idempotency_key:
        seen = await run_in_threadpool(service.file_of_key, session, tenant_id=tenant.id, key=idempotency_key)
        if seen is not None:
            return FileObject.of(seen)
    # A tenant already at its storage limit is refused before its body is read.
    await run_in_threadpool(
        check_storage,
        session,
        tenant_id=tenant.id,
        adding=1,
        limit=settings.max_stored_bytes_per_tenant,
        what="another file",
        lock=False,
    )
    received = await receive_upload(request.headers.get("content-type"), request.stream(), scratch_dir=settings.tmp_dir)
    try:
        if received.file is None:
            raise service.missing_file()
        service.check_form_fields(received.fields)
        row = await run_in_threadpool(
            service.create_file,
            session,
            settings=settings,
            storage=storage,
            models=models,
            tenant_id=tenant.id,
            filename=received.filename,
            purpose=received.fields.get("purpose", "fine-tune"),
            base_model=received.fields.get("base_model"),
            fileobj=received.file,
        )
    finally:
        received.close()
    if idempotency_key:
        idempotency.remember(
            session, tenant_id=tenant.id, endpoint="files", key=idempotency_key, resource_id=row.id, request_sha256=None
        )
    winner = await run_in_threadpool(
        idempotency.commit_or_winner, session, tenant_id=tenant.id, endpoint="files", key=idempotency_key
    )
    if winner is not None:  # the same key's first request won: this upload was rolled back, its object removed
        return FileObject.of(service.get_file(session, tenant_id=tenant.id, file_id=winner))
    return FileObject.of(row)


@router.get("")
def list_files(
    session: SessionDep, tenant: TenantDep, limit: LimitQuery = DEFAULT_LIMIT, after: AfterQuery = None
) -> ListPage[FileObject]:
    rows, has_more = service.list_files(session, tenant_id=tenant.id, limit=limit, after=after)
    return ListPage(data=[FileObject.of(f) for f in rows], has_more=has_more)


@router.get("/{file_id}")
def get_file(file_id: FileId, session: SessionDep, tenant: TenantDep) -> FileObject:
    return FileObject.of(service.get_file(session, tenant_id=tenant.id, file_id=file_id))


@router.delete("/{file_id}")
def delete_file(file_id: FileId, session: SessionDep, storage: StorageDep, tenant: TenantDep) -> FileDeleted:
    """Delete a file; refused with 409 while a job that has not ended uses it."""
    row = service.delete_file(session, storage=storage, tenant_id=tenant.id, file_id=file_id)
    return FileDeleted(id=row.id)
