"""The registered models' tokenizers over the Hugging Face Hub's file protocol, under `/hf`: with
`HF_ENDPOINT=http://<host>:<port>/hf`, `AutoTokenizer.from_pretrained("<model id>")` (what the tinker client's
`get_tokenizer()` calls) loads a model's tokenizer from this server, offline. Read-only and public (a tokenizer is
its vocabulary and chat template, no weights): only the files of a model's tokenizer folder are served.

What `huggingface_hub` reads: `HEAD`/`GET /{repo}/resolve/{revision}/{file}` with the headers `X-Repo-Commit`
(a commit id: here derived from the model's revision) and `ETag`; a missing file is a 404 with `X-Error-Code:
EntryNotFound` (optional files are tried), an unknown model one with `RepoNotFound`; and the file tree of a folder
(`/api/models/{repo}/tree/{revision}/{path}`), which transformers asks for extra chat templates.
"""

from __future__ import annotations

import hashlib
from pathlib import Path as FsPath
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import FileResponse, JSONResponse

from app.core.db import session_scope
from app.ml.models import ModelRecord
from app.models.repository import find_model

router = APIRouter(prefix="/hf", tags=["tokenizers"], include_in_schema=False)

Segment = Annotated[str, Path(max_length=200)]


def _not_found(code: str, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=404, headers={"X-Error-Code": code, "X-Error-Message": message})


def _model(request: Request, repo: str) -> ModelRecord | None:
    with session_scope(request.app.state.settings.db_url) as session:
        return find_model(session, repo)


def _commit(record: ModelRecord) -> str:
    return hashlib.sha1(f"{record.id}:{record.revision}".encode()).hexdigest()


def _files(request: Request, record: ModelRecord) -> dict[str, FsPath]:
    folder = request.app.state.models.tokenizer_dir(record)
    return {item.name: item for item in sorted(folder.iterdir()) if item.is_file() and not item.name.startswith(".")}


@router.api_route("/{repo}/resolve/{revision}/{filename:path}", methods=["GET", "HEAD"])
def resolve(repo: Segment, revision: Segment, filename: Annotated[str, Path(max_length=300)], request: Request) -> Any:
    record = _model(request, repo)
    if record is None:
        return _not_found("RepoNotFound", f"no model {repo[:80]!r} on this server")
    path = _files(request, record).get(filename)
    if path is None:
        return _not_found("EntryNotFound", f"{filename[:80]!r} is not one of {repo}'s tokenizer files")
    etag = hashlib.sha256(path.read_bytes()).hexdigest()
    headers = {"X-Repo-Commit": _commit(record), "ETag": f'"{etag}"'}
    if request.method == "HEAD":
        return Response(headers={**headers, "Content-Length": str(path.stat().st_size)})
    return FileResponse(path, headers=headers)


@router.get("/api/models/{repo}/tree/{revision}/{subfolder:path}")
@router.get("/api/models/{repo}/tree/{revision}")
def tree(repo: Segment, revision: Segment, request: Request, subfolder: str = "") -> Any:
    record = _model(request, repo)
    if record is None:
        return _not_found("RepoNotFound", f"no model {repo[:80]!r} on this server")
    if subfolder:
        return _not_found("EntryNotFound", f"{subfolder[:80]!r}: a tokenizer folder has no subfolders")
    return [
        {"type": "file", "path": name, "size": path.stat().st_size, "oid": _commit(record)}
        for name, path in _files(request, record).items()
    ]


@router.get("/api/models/{repo}/revision/{revision}")
@router.get("/api/models/{repo}")
def model_info(repo: Segment, request: Request, revision: str = "main") -> Any:
    record = _model(request, repo)
    if record is None:
        return _not_found("RepoNotFound", f"no model {repo[:80]!r} on this server")
    siblings = [{"rfilename": name} for name in _files(request, record)]
    return {"id": record.id, "modelId": record.id, "sha": _commit(record), "private": False, "siblings": siblings}
