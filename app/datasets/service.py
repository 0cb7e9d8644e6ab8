"""Uploads: validate every line, then stream the file to the object store; nothing is kept of a bad file."""

from __future__ import annotations

import hashlib
import os
from typing import IO

from sqlalchemy.orm import Session

from app.core.errors import InvalidInput, NotFound, PayloadTooLarge
from app.core.ids import new_id
from app.core.models import File, utcnow
from app.core.settings import Settings
from app.core.storage import CHUNK_SIZE, ObjectStorage
from app.datasets import repository
from app.datasets.validation import LineValidator, ValidationReport
from app.ml.registry import load_tokenizer

PURPOSES = ("fine-tune",)


def upload_too_large(max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"file is larger than the upload limit of {max_bytes} bytes", param="file")


def _scan(fileobj: IO[bytes], validator: LineValidator, max_bytes: int) -> tuple[int, str]:
    """One pass over the upload: split lines, validate each, hash and count bytes."""
    digest = hashlib.sha256()
    size = 0
    line_no = 0
    pending = b""
    while chunk := fileobj.read(CHUNK_SIZE):
        size += len(chunk)
        if size > max_bytes:
            raise upload_too_large(max_bytes)
        digest.update(chunk)
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        for raw in lines:
            line_no += 1
            validator.feed(line_no, raw.removesuffix(b"\r"))
    if pending:
        line_no += 1
        validator.feed(line_no, pending.removesuffix(b"\r"))
    validator.finish()
    return size, digest.hexdigest()


def create_file(
    session: Session,
    *,
    settings: Settings,
    storage: ObjectStorage,
    tenant_id: str,
    filename: str,
    purpose: str,
    fileobj: IO[bytes],
) -> File:
    if purpose not in PURPOSES:
        raise InvalidInput(f"purpose must be one of: {', '.join(PURPOSES)} (got {purpose!r})", param="purpose")
    if not filename.lower().endswith(".jsonl"):
        raise InvalidInput("training files must be JSONL (a .jsonl file name)", param="file", code="invalid_file_type")
    validator = LineValidator(load_tokenizer(settings.models_dir), settings.max_reported_line_errors)
    size, sha256 = _scan(fileobj, validator, settings.max_upload_bytes)
    report = validator.report
    if size == 0 or report.n_examples == 0 and report.n_errors == 0:
        raise InvalidInput("the file is empty: it has no examples", param="file", code="empty_file")
    if report.n_errors:
        raise _rejection(report)

    file_id = new_id("file")
    key = f"datasets/{tenant_id}/{file_id}.jsonl"
    fileobj.seek(0, os.SEEK_SET)
    storage.put_file(key, fileobj)
    row = File(
        id=file_id,
        tenant_id=tenant_id,
        filename=os.path.basename(filename),
        purpose=purpose,
        bytes=size,
        sha256=sha256,
        format=report.format or "unknown",
        n_examples=report.n_examples,
        n_tokens=report.n_tokens,
        storage_key=key,
    )
    session.add(row)
    session.flush()
    return row


def _rejection(report: ValidationReport) -> InvalidInput:
    first = report.errors[0]
    more = f" and {report.n_errors - 1} more bad line(s)" if report.n_errors > 1 else ""
    return InvalidInput(
        f"line {first.line}: {first.message}{more}; nothing was stored",
        param="file",
        code="invalid_file",
        extra={"report": report.as_dict()},
    )


def get_file(session: Session, *, tenant_id: str, file_id: str) -> File:
    row = repository.get_file(session, tenant_id=tenant_id, file_id=file_id)
    if row is None:
        raise NotFound(f"no file with id {file_id!r}", param="file_id")
    return row


def list_files(session: Session, *, tenant_id: str) -> list[File]:
    return repository.list_files(session, tenant_id=tenant_id)


def delete_file(session: Session, *, storage: ObjectStorage, tenant_id: str, file_id: str) -> File:
    """Soft-delete the row (jobs keep their reference) and remove the stored object."""
    row = get_file(session, tenant_id=tenant_id, file_id=file_id)
    row.deleted_at = utcnow()
    session.flush()
    storage.delete(row.storage_key)
    return row
