"""Serves the dashboard's page and assets at /ui (public: the page asks for the API key and sends it itself)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, Response

from app.core.errors import NotFound
from app.core.models import TERMINAL_STATUSES

STATIC_DIR = Path(__file__).parent / "static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",  # ES modules load only with a JavaScript type
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
}
# Only the files the package ships, listed once: a request names one of them or gets 404, never a path outside.
ASSETS = {
    path.relative_to(STATIC_DIR).as_posix(): path
    for path in sorted(STATIC_DIR.rglob("*"))
    if path.is_file() and path.suffix in MEDIA_TYPES
}

# The page runs only its own files: no inline script or style, nothing from another origin, no plugin, and no
# other site may frame it (clickjacking: the page holds an API key). `data:` images: its empty favicon.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
HEADERS = {
    "Cache-Control": "no-cache",  # revalidated on each load (ETag): a new version of the package shows at once
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it
    "X-Content-Type-Options": "nosniff",
}

# A module made from the job state machine (app/jobs/state.py), so that the page knows which states end a job
# without a copy of them.
JOB_STATES_MODULE = "job_states.js"
JOB_STATES_JS = f"export const TERMINAL_STATUSES = {json.dumps(sorted(TERMINAL_STATUSES))};\n"

router = APIRouter(prefix="/ui", include_in_schema=False)


def _file(name: str) -> FileResponse:
    path = ASSETS.get(name)
    if path is None:
        raise NotFound(f"no dashboard asset named {name!r}", param="path")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)


@router.get("")
@router.get("/")
def page() -> FileResponse:
    return _file("index.html")


@router.get("/static/{name:path}")
def asset(name: Annotated[str, PathParam(max_length=200)]) -> Response:
    if name == JOB_STATES_MODULE:
        return Response(JOB_STATES_JS, media_type=MEDIA_TYPES[".js"], headers=HEADERS)
    return _file(name)
