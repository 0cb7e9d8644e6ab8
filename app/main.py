"""The FastAPI application: routers, error handlers, shared state."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from app.adapters.endpoints import router as adapters_router
from app.core.db import get_engine
from app.core.errors import install_error_handlers
from app.core.settings import Settings, get_settings
from app.core.storage import ObjectStorage
from app.datasets.endpoints import router as files_router
from app.datasets.service import upload_too_large
from app.generation.endpoints import router as generation_router
from app.jobs.endpoints import router as jobs_router

# Multipart framing around the file: a request larger than the limit plus this is refused unread.
MULTIPART_OVERHEAD = 64 * 1024


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if app.state.engine is not None:
            app.state.engine.close()

    app = FastAPI(title="Tuneforge", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.storage = ObjectStorage.from_settings(settings)
    app.state.engine = None
    app.state.engine_lock = threading.Lock()
    install_error_handlers(app)

    @app.middleware("http")
    async def refuse_oversized_uploads(request: Request, call_next):  # type: ignore[no-untyped-def]
        length = request.headers.get("content-length")
        if (
            request.url.path == "/v1/files"
            and length
            and length.isdigit()
            and int(length) > settings.max_upload_bytes + MULTIPART_OVERHEAD
        ):
            return upload_too_large(settings.max_upload_bytes).response()
        return await call_next(request)

    @app.get("/healthz", tags=["health"])
    def healthz() -> Response:
        with get_engine(settings.db_url).connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        return JSONResponse({"status": "ok"})

    app.include_router(files_router)
    app.include_router(jobs_router)
    app.include_router(adapters_router)
    app.include_router(generation_router)
    return app
