"""HTTP routes for training files."""

from typing import Annotated

from fastapi import APIRouter, Form, UploadFile, status

from app.core.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from app.datasets import service
from app.datasets.schemas import FileDeleted, FileList, FileObject

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post("", status_code=status.HTTP_201_CREATED)
def upload_file(
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    tenant: TenantDep,
    file: UploadFile,
    purpose: Annotated[str, Form()] = "fine-tune",
) -> FileObject:
    row = service.create_file(
        session,
        settings=settings,
        storage=storage,
        tenant_id=tenant.id,
        filename=file.filename or "upload.jsonl",
        purpose=purpose,
        fileobj=file.file,
    )
    return FileObject.of(row)


@router.get("")
def list_files(session: SessionDep, tenant: TenantDep) -> FileList:
    return FileList(data=[FileObject.of(f) for f in service.list_files(session, tenant_id=tenant.id)])


@router.get("/{file_id}")
def get_file(file_id: str, session: SessionDep, tenant: TenantDep) -> FileObject:
    return FileObject.of(service.get_file(session, tenant_id=tenant.id, file_id=file_id))


@router.delete("/{file_id}")
def delete_file(file_id: str, session: SessionDep, storage: StorageDep, tenant: TenantDep) -> FileDeleted:
    row = service.delete_file(session, storage=storage, tenant_id=tenant.id, file_id=file_id)
    return FileDeleted(id=row.id)
