"""Base models: look them up for jobs and /generate, register the ones an operator brings, remove them."""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.db import locked, undo_on_rollback
from app.core.errors import Conflict, ErrorCode, InvalidInput, NotFound, ServiceUnavailable, clip
from app.core.models import ACTIVE_STATUSES, Adapter, Job, RegisteredModel
from app.core.storage import ObjectStorage
from app.ml.models import (
    BUILTINS,
    ModelFile,
    ModelRecord,
    ModelStore,
    ModelUnavailable,
    manifest_revision,
    tokenizer_identity,
)
from app.ml.models import importing as model_import
from app.models.repository import all_models, find_model, lock_blobs, record_of, used_blobs

log = logging.getLogger(__name__)

MODEL_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MAX_DESCRIPTION_CHARS = 500
Source = Literal["path", "gguf", "hf-repo"]


def list_models(session: Session) -> list[ModelRecord]:
    return all_models(session)


# /v1/models is not paged (OpenAI's is not): the tenant's newest adapters, at most this many.
MAX_LISTED_ADAPTERS = 1000


def list_adapter_models(session: Session, *, tenant_id: str) -> list[Adapter]:
    query = (
        select(Adapter)
        .where(Adapter.tenant_id == tenant_id)
        .order_by(Adapter.created_at.desc(), Adapter.id.desc())
        .limit(MAX_LISTED_ADAPTERS)
    )
    return list(session.scalars(query))


def get_model(session: Session, *, model_id: str) -> ModelRecord:
    record = find_model(session, model_id)
    if record is None:
        raise NotFound(f"no base model with id {clip(model_id)}", param="model_id", code=ErrorCode.model_not_found)
    return record


def require_model(session: Session, *, model_id: str, param: str = "base_model", lock: bool = False) -> ModelRecord:
    """The model a request names, or a 422 that lists the available ones."""
    record = find_model(session, model_id, lock=lock)
    if record is None:
        available = ", ".join(r.id for r in all_models(session))
        raise InvalidInput(
            f"unknown {param} {clip(model_id)}; available: {available}", param=param, code=ErrorCode.model_not_found
        )
    return record


def model_unavailable(model_id: str, exc: ModelUnavailable) -> ServiceUnavailable:
    """The base model's files cannot be had on this machine: the operator's problem, said without internals."""
    log.error("base model %s unavailable: %s", model_id, exc)
    return ServiceUnavailable(
        f"base model {model_id} cannot be loaded on this server (its stored files are missing or damaged); "
        "the operator's log has the details",
        code=ErrorCode.model_unavailable,
    )


def load_tokenizer(models: ModelStore, record: ModelRecord) -> Any:
    """The model's tokenizer, or a 503 when its files cannot be had here."""
    try:
        return models.tokenizer(record)
    except ModelUnavailable as exc:
        raise model_unavailable(record.id, exc) from None


def register_model(
    session: Session,
    *,
    store: ModelStore,
    storage: ObjectStorage,
    scratch_dir: Path,
    model_id: str,
    source: Source,
    location: str,
    hf_revision: str | None = None,
    max_seq_length: int | None = None,
    chat_template_file: Path | None = None,
    tool_call_format: str | None = None,
    description: str | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> ModelRecord:
    """Check the model, copy its files into the object store (content-addressed), and add its row.

    Nothing is registered unless every check passes; files already in the store (another model's tokenizer, say)
    are not stored twice. Raises InvalidInput / Conflict for a bad id, ModelImportError for a bad model.
    """
    if not MODEL_ID_PATTERN.match(model_id):
        raise InvalidInput(
            f"model id {clip(model_id)} must be 1-64 characters of a-z, 0-9, '.', '_' and '-', starting with a "
            "letter or digit",
            param="id",
        )
    if find_model(session, model_id) is not None:
        what = "a built-in model" if model_id in BUILTINS else "already registered"
        raise Conflict(f"model id {model_id} is {what}; choose another id", param="id", code=ErrorCode.model_exists)
    if description is not None and len(description) > MAX_DESCRIPTION_CHARS:
        raise InvalidInput(f"the description is longer than {MAX_DESCRIPTION_CHARS} characters", param="description")
    model_import.check_tool_call_format(tool_call_format)

    scratch_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="model-", dir=scratch_dir) as tmp:
        stage = Path(tmp) / "model"
        stage.mkdir()
        origin = None
        if source == "hf-repo":
            folder = model_import.resolve_hf_repo(location, hf_revision)
            progress(f"found {location} in the local Hugging Face cache")
            model_import.stage_hf_snapshot(folder, stage)
            origin = location
        elif source == "path":
            model_import.stage_folder(Path(location).expanduser(), stage)
        else:
            progress(f"converting {Path(location).name} (once)")
            model_import.stage_gguf(Path(location).expanduser(), stage)
        if chat_template_file is not None:
            model_import.set_chat_template(stage, chat_template_file.expanduser())
        progress("checking the model, its weights and its tokenizer")
        facts = model_import.inspect(stage, max_seq_length=max_seq_length, tool_call_format=tool_call_format)
        files = model_import.manifest(stage)
        revision = manifest_revision(files)
        row = RegisteredModel(
            id=model_id,
            description=description or f"{facts.architecture} model registered from {source} {Path(location).name}",
            source=source,
            origin=origin,
            architecture=facts.architecture,
            n_parameters=facts.n_parameters,
            max_seq_length=facts.max_seq_length,
            chat_template=facts.chat_template,
            n_layers=facts.n_layers,
            tool_call_format=facts.tool_call_format,
            linear_modules=list(facts.linear_modules),
            default_target_modules=list(facts.default_target_modules),
            revision=revision,
            tokenizer_sha256=tokenizer_identity(files),
            files=[{"path": f.path, "sha256": f.sha256, "size": f.size} for f in files],
        )
        total = sum(f.size for f in files)
        progress(f"storing {len(files)} files ({total / 1e6:.1f} MB) in the object store")
        written: list[ModelFile] = []
        bind = session.get_bind()
        # Not committed after all: the blobs this call stored go again, unless another model uses them by then.
        undo_on_rollback(session, lambda: _delete_unused_blobs_now(bind, storage, written))
        _store_missing(storage, stage, files, written)
        # Checked again and committed under the blobs' lock: a blob found stored above may have been deleted since
        # by the removal of the last model that used it; once this row is committed, no removal deletes it.
        lock_blobs(session)
        _store_missing(storage, stage, files, written)
        session.add(row)
        try:
            session.flush()
        except IntegrityError:
            raise Conflict(
                f"model id {model_id} is already registered", param="id", code=ErrorCode.model_exists
            ) from None
        record = record_of(row)
        # This machine keeps the checked copy in its cache: it needs not fetch what it has just stored.
        store.adopt(record, stage)
    return record


def _store_missing(storage: ObjectStorage, stage: Path, files: list[ModelFile], written: list[ModelFile]) -> None:
    for item in files:
        if not storage.exists(item.blob_key):
            storage.put_path(item.blob_key, stage / item.path)
            written.append(item)


def remove_model(session: Session, *, model_id: str) -> ModelRecord:
    """Delete a registered model's row; refused while a job that has not ended uses it.

    Its files stay in the object store: once the removal is committed, `delete_unused_blobs` deletes those no
    model uses (before, a failed commit would leave a registered model without its files).
    """
    if model_id in BUILTINS:
        raise Conflict(
            f"{model_id} is a built-in model; it cannot be removed", param="id", code=ErrorCode.model_builtin
        )
    row = session.scalars(locked(session, select(RegisteredModel).where(RegisteredModel.id == model_id))).one_or_none()
    if row is None:
        raise NotFound(f"no registered model with id {clip(model_id)}", param="id", code=ErrorCode.model_not_found)
    job_id = session.scalars(
        select(Job.id).where(Job.base_model == model_id, Job.status.in_(ACTIVE_STATUSES)).limit(1)
    ).first()
    if job_id is not None:
        raise Conflict(
            f"model {model_id} is used by job {job_id}, which has not ended; cancel the job or wait for it to end",
            param="id",
            code=ErrorCode.model_in_use,
        )
    record = record_of(row)
    session.delete(row)
    session.flush()
    return record


def delete_unused_blobs(session: Session, *, storage: ObjectStorage, files: Sequence[ModelFile]) -> int:
    """Delete from the object store the blobs of `files` that no registered model uses (a removed model's, once
    its removal is committed); returns how many. Decided and done under the blobs' lock, held until this
    transaction ends, so a model being added (which commits under it) keeps every blob it uses."""
    lock_blobs(session)
    used = used_blobs(session)
    unused = {f.blob_key for f in files if f.sha256 not in used}
    for key in sorted(unused):
        storage.delete(key)
    return len(unused)


def _delete_unused_blobs_now(bind: Any, storage: ObjectStorage, files: list[ModelFile]) -> None:
    if files:
        with Session(bind) as own, own.begin():
            delete_unused_blobs(own, storage=storage, files=files)


def forget_local_copy(store: ModelStore, record: ModelRecord) -> None:
    shutil.rmtree(store.registered_dir(record), ignore_errors=True)
