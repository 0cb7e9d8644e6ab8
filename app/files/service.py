"""Uploads: validate every line, then stream the file to the object store; nothing is kept of a bad file."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from typing import IO, Any, TypeVar

from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from app.core import idempotency
from app.core.db import session_scope
from app.core.errors import Conflict, ErrorCode, InvalidInput, NotFound, PayloadTooLarge, clip
from app.core.ids import new_id
from app.core.models import File, FileTokenCount, utcnow
from app.core.pagination import cursor_row
from app.core.settings import Settings
from app.core.storage import ObjectStorage, delete_after_commit, read_chunks
from app.core.usage import check_storage
from app.files import repository
from app.files.validation import EvalItemsValidator, LineValidator, ValidationReport
from app.ml.jsonl import split_lines
from app.ml.models import ModelRecord, ModelStore
from app.models.service import load_tokenizer, require_model

PURPOSES = ("fine-tune", "evals")  # evals: items of eval runs (app/evals/), not training data
T = TypeVar("T")
MAX_FILENAME_CHARS = 255


def upload_too_large(max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"file is larger than the upload limit of {max_bytes} bytes", param="file")


def _scan(stream: Iterator[bytes], validator: LineValidator | EvalItemsValidator, max_bytes: int) -> tuple[int, str]:
    """One pass over the file: split lines, validate each, hash and count bytes."""
    digest = hashlib.sha256()
    size = 0

    def chunks() -> Iterator[bytes]:
        nonlocal size
        for chunk in stream:
            size += len(chunk)
            if size > max_bytes:
                raise upload_too_large(max_bytes)
            digest.update(chunk)
            yield chunk

    for line in split_lines(chunks()):
        validator.feed(line)
    validator.finish()
    return size, digest.hexdigest()


def missing_file() -> InvalidInput:
    return InvalidInput(
        "the request has no `file` part: send the JSONL file as `file`", param="file", code=ErrorCode.missing_field
    )


def check_form_fields(fields: dict[str, str]) -> None:
    unknown = sorted(set(fields) - {"purpose", "base_model"})
    if unknown:
        raise InvalidInput(
            f"unknown form field {clip(unknown[0])}: send `file` and, optionally, `purpose` and `base_model`",
            param=unknown[0][:64],
            code=ErrorCode.unknown_field,
        )


def clean_filename(filename: str | None) -> str:
    """The name to keep: its last path component, checked for length and control characters."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1].strip()
    if not name:
        raise InvalidInput("the file part has no file name", param="file", code=ErrorCode.invalid_filename)
    if len(name) > MAX_FILENAME_CHARS:
        raise InvalidInput(
            f"the file name is {len(name)} characters long; at most {MAX_FILENAME_CHARS} are allowed",
            param="file",
            code=ErrorCode.invalid_filename,
        )
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise InvalidInput("the file name contains control characters", param="file", code=ErrorCode.invalid_filename)
    return name


def check_upload(*, filename: str | None, purpose: str, base_model: str | None) -> str:
    """The upload's form checked before any work: the name to keep."""
    if purpose not in PURPOSES:
        raise InvalidInput(f"purpose must be one of: {', '.join(PURPOSES)} (got {clip(purpose)})", param="purpose")
    name = clean_filename(filename)
    if not name.lower().endswith(".jsonl"):
        raise InvalidInput(
            "training files must be JSONL (a .jsonl file name)", param="file", code=ErrorCode.invalid_file_type
        )
    if base_model is not None and len(base_model) > 64:
        raise InvalidInput("base_model is longer than 64 characters", param="base_model")
    return name


def create_file(
    *,
    settings: Settings,
    storage: ObjectStorage,
    models: ModelStore,
    tenant_id: str,
    filename: str | None,
    purpose: str,
    fileobj: IO[bytes],
    base_model: str | None = None,
    idempotency_key: str | None = None,
) -> File:
    """Validate every line, store the file and its row; if the row is not committed the object is removed.

    No database connection is held while the file is read and validated or while it is stored: the model is
    looked up in a short transaction of its own, and the quota check and the row in another, after the object is
    stored. Tokens are counted with `base_model`'s tokenizer (default: the service's default model); a job on a
    model with another tokenizer counts them again when it is created. With an `idempotency_key` that a
    concurrent request committed first, that request's file is returned (and this one's object removed).
    """
    name = check_upload(filename=filename, purpose=purpose, base_model=base_model)
    with session_scope(settings.db_url) as session:
        record = require_model(session, model_id=base_model or settings.default_base_model)
    validator: LineValidator | EvalItemsValidator
    if purpose == "evals":
        validator = EvalItemsValidator(settings.max_reported_line_errors)
    else:
        validator = LineValidator(
            load_tokenizer(models, record),
            settings.max_reported_line_errors,
            model_id=record.id,
            tool_call_format=record.tool_call_format,
            tools_counted_later=base_model is None,
        )
    size, sha256 = _scan(read_chunks(fileobj), validator, settings.max_upload_bytes)
    report = validator.report
    if size == 0 or report.n_examples == 0 and report.n_errors == 0:
        raise InvalidInput("the file is empty: it has no examples", param="file", code=ErrorCode.empty_file)
    if report.n_errors:
        raise _rejection(report)

    file_id = new_id("file")
    key = f"datasets/{tenant_id}/{file_id}.jsonl"
    fileobj.seek(0, os.SEEK_SET)
    storage.put_file(key, fileobj)
    try:
        with session_scope(settings.db_url) as session:
            check_storage(
                session,
                tenant_id=tenant_id,
                adding=size,
                limit=settings.max_stored_bytes_per_tenant,
                what=f"this file ({size:,} bytes)",
            )
            row = File(
                id=file_id,
                tenant_id=tenant_id,
                filename=name,
                purpose=purpose,
                bytes=size,
                sha256=sha256,
                format=report.format or "unknown",
                n_examples=report.n_examples,
                n_tokens=report.n_tokens,
                max_example_tokens=report.max_example_tokens,
                has_tools=report.has_tools,
                tokenizer_model=record.id,
                storage_key=key,
            )
            session.add(row)
            session.flush()
            if report.counted_exactly:  # else each job's model counts the file (`count_outside`)
                session.add(
                    FileTokenCount(
                        file_id=row.id,
                        tokenizer_sha256=record.tokenizer_sha256,
                        n_tokens=report.n_tokens,
                        max_example_tokens=report.max_example_tokens,
                    )
                )
            if idempotency_key is None:
                return row
            idempotency.remember(
                session,
                tenant_id=tenant_id,
                endpoint="files",
                key=idempotency_key,
                resource_id=row.id,
                request_sha256=None,
            )
            winner = idempotency.commit_or_winner(session, tenant_id=tenant_id, endpoint="files", key=idempotency_key)
            if winner is None:
                return row
            storage.delete(key)  # the same key's first request won: this upload's row was rolled back
            return get_file(session, tenant_id=tenant_id, file_id=winner)
    except BaseException:
        storage.delete(key)  # no committed row names it
        raise


class TokensNotCounted(Exception):
    """A file's tokens are not counted yet with a model's tokenizer (what `token_counts` raises, so that its caller
    counts them holding no database connection: `count_outside`)."""

    def __init__(self, file: File, model: ModelRecord, param: str) -> None:
        super().__init__(f"file {file.id} is not counted with {model.id}'s tokenizer yet")
        self.file = file
        self.model = model
        self.param = param


def token_counts(session: Session, *, file: File, model: ModelRecord, param: str) -> FileTokenCount:
    """The file's tokens as `model`'s tokenizer counts them, stored at upload (or by an earlier job);
    TokensNotCounted when they are not stored yet."""
    found = session.get(FileTokenCount, (file.id, model.tokenizer_sha256))
    if found is None:
        raise TokensNotCounted(file, model, param)
    return found


def count_outside(session: Session, *, storage: ObjectStorage, models: ModelStore, attempt: Callable[[], T]) -> T:
    """`attempt()`, which reads token counts (`token_counts`); each time a file's are missing, the session is rolled
    back (releasing its connection and its row locks), the file is counted with no connection held and the count
    kept, and `attempt()` runs again. Most files were counted at upload with the job's tokenizer: then it runs once.

    Counting reads the whole file again and renders it with the model's chat template, so a line that template
    cannot render is a 422 naming the line, as at upload. The count is kept in a transaction of its own: a job
    refused afterwards (its examples too long, say) does not throw away the work."""
    while True:
        try:
            return attempt()
        except TokensNotCounted as missing:
            bind = session.get_bind()
            session.expunge(missing.file)  # kept as it is: the rollback would expire it, and reading it reconnect
            session.rollback()
            _keep(bind, _count(storage, models, missing.file, missing.model, missing.param))


def _count(storage: ObjectStorage, models: ModelStore, file: File, model: ModelRecord, param: str) -> FileTokenCount:
    validator = LineValidator(
        load_tokenizer(models, model), 1, model_id=model.id, tool_call_format=model.tool_call_format
    )
    try:
        _size, _sha = _scan(storage.open(file.storage_key)[1], validator, max_bytes=file.bytes)
    except FileNotFoundError:
        raise InvalidInput(
            f"{param}: file {file.id} can no longer be read from storage; upload it again",
            param=param,
            code=ErrorCode.file_unavailable,
        ) from None
    report = validator.report
    if report.n_errors:
        first = report.errors[0]
        raise InvalidInput(
            f"{param}: file {file.id}, line {first.line}, with {model.id}'s tokenizer: {first.message}",
            param=param,
            code=ErrorCode.invalid_file_for_model,
        )
    return FileTokenCount(
        file_id=file.id,
        tokenizer_sha256=model.tokenizer_sha256,
        n_tokens=report.n_tokens,
        max_example_tokens=report.max_example_tokens,
        created_at=utcnow(),
    )


def _keep(bind: Any, counted: FileTokenCount) -> None:
    """Store a count in a transaction of its own (a concurrent job on the same model may have stored it first)."""
    values = {
        "file_id": counted.file_id,
        "tokenizer_sha256": counted.tokenizer_sha256,
        "n_tokens": counted.n_tokens,
        "max_example_tokens": counted.max_example_tokens,
        "created_at": counted.created_at,
    }
    insert = postgresql_insert if bind.dialect.name == "postgresql" else sqlite_insert
    with Session(bind) as own, own.begin():
        own.execute(insert(FileTokenCount).values(**values).on_conflict_do_nothing())


def _rejection(report: ValidationReport) -> InvalidInput:
    first = report.errors[0]
    more = f" and {report.n_errors - 1} more bad line(s)" if report.n_errors > 1 else ""
    return InvalidInput(
        f"line {first.line}: {first.message}{more}; nothing was stored",
        param="file",
        code=ErrorCode.invalid_file,
        extra={"report": report.as_dict()},
    )


def file_of_key(session: Session, *, tenant_id: str, key: str) -> File | None:
    """The file an upload with this `Idempotency-Key` stored, if it is still there (a deleted file's key is
    forgotten: the key may store a new one)."""
    seen = idempotency.find(session, tenant_id=tenant_id, endpoint="files", key=key)
    if seen is None:
        return None
    row = repository.get_file(session, tenant_id=tenant_id, file_id=seen.resource_id)
    if row is None:
        session.delete(seen)
        session.flush()
    return row


def get_file(session: Session, *, tenant_id: str, file_id: str, for_update: bool = False) -> File:
    row = repository.get_file(session, tenant_id=tenant_id, file_id=file_id, for_update=for_update)
    if row is None:
        raise NotFound(f"no file with id {clip(file_id)}", param="file_id")
    return row


def list_files(session: Session, *, tenant_id: str, limit: int, after: str | None) -> tuple[list[File], bool]:
    cursor = cursor_row(after, lambda file_id: repository.get_file(session, tenant_id=tenant_id, file_id=file_id))
    return repository.list_files(session, tenant_id=tenant_id, limit=limit, after=cursor)


def delete_file(session: Session, *, storage: ObjectStorage, tenant_id: str, file_id: str) -> File:
    """Soft-delete the row (finished jobs keep their reference) and remove the stored object once that is
    committed (a deletion rolled back keeps a file whose object is still there).

    Refused (409) while a job that has not ended uses the file: its worker still has to read it.
    """
    row = get_file(session, tenant_id=tenant_id, file_id=file_id, for_update=True)
    job_id = repository.active_job_using(session, file_id=row.id)
    if job_id is not None:
        raise Conflict(
            f"file {row.id} is used by job {job_id}, which has not ended; cancel the job or wait for it to end",
            param="file_id",
            code=ErrorCode.file_in_use,
        )
    row.deleted_at = utcnow()
    session.flush()
    delete_after_commit(session, storage, [row.storage_key], what=f"file {row.id}")
    return row
