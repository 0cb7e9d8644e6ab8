"""The FastAPI application: routers, error handlers, shared state."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, nullcontext
from typing import Literal

import swagger_ui_bundle
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from app.adapters.endpoints import router as adapters_router
from app.core.concurrency import TenantSlots, TenantThreads
from app.core.db import session_scope
from app.core.errors import AppError, ErrorCode, install_error_handlers
from app.core.health import router as health_router
from app.core.metrics import Metrics
from app.core.metrics import router as metrics_router
from app.core.middleware import (
    AuthenticationMiddleware,
    BodyLimitMiddleware,
    RequestContextMiddleware,
    request_too_large,
)
from app.core.models import Tenant
from app.core.readiness import ReadinessProbe
from app.core.settings import Settings, get_settings
from app.core.storage import ObjectStorage
from app.evals.endpoints import router as evals_router
from app.evals.runner import EvalRunner
from app.files.endpoints import router as files_router
from app.files.service import upload_too_large
from app.inference.endpoints import router as generation_router
from app.inference.engine import generation_engine
from app.jobs.endpoints import router as jobs_router
from app.jobs.reaper import Reaper
from app.ml.models import ModelStore
from app.models.endpoints import router as models_router
from app.openai.fine_tuning import router as fine_tuning_router
from app.openai.inference import router as openai_inference_router
from app.sweeps.controller import SweepController
from app.sweeps.endpoints import router as sweeps_router
from app.tinker.endpoints import router as tinker_router
from app.tinker.hub import router as hub_router
from app.tinker.runs import router as training_runs_router
from app.tinker.service import TinkerService, expire_tinker_sessions
from app.ui.endpoints import router as ui_router
from app.webhooks.delivery import WebhookSender
from app.webhooks.endpoints import router as webhooks_router

# Multipart framing around the file: a request larger than the limit plus this is refused unread.
MULTIPART_OVERHEAD = 64 * 1024


def create_app(settings: Settings | None = None, *, role: Literal["api", "serve"] = "api") -> FastAPI:
    """The application. `api`: every route (the serving engine starts with the first generation request);
    `serve` (`tuneforge serve`, any number of replicas): the inference routes only (`/generate`, `/v1/completions`,
    `/v1/chat/completions`, `/v1/models`) and health, from the same code."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # API processes re-queue jobs whose worker died, whoever else also looks, send webhooks that are due,
        # execute eval runs and advance sweeps;
        # serving replicas leave jobs alone.
        api = role == "api"
        runner = EvalRunner(settings, app.state.models, lambda: generation_engine(app.state), app.state.metrics)
        controller = SweepController(settings, app.state.storage, app.state.models)
        app.state.eval_runner = runner if api else None
        app.state.sweep_controller = controller if api else None
        with (
            Reaper(settings) if api else contextlib.nullcontext(),
            WebhookSender(settings) if api else nullcontext(),
            runner if api else nullcontext(),
            controller if api else nullcontext(),
        ):
            expiry = asyncio.create_task(expire_tinker_sessions(app.state.tinker)) if api else None
            yield
            if expiry is not None:
                expiry.cancel()
        if app.state.engine is not None:
            app.state.engine.close()

    app = FastAPI(
        title="Tuneforge",
        version="0.1.0",
        description="Self-hostable fine-tuning as a service. Authenticate with `Authorization: Bearer <API key>`.",
        lifespan=lifespan,
        docs_url=None,  # served below from local assets: the docs work without internet access
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.storage = ObjectStorage.from_settings(settings)
    app.state.models = ModelStore(settings.models_dir, app.state.storage)
    app.state.engine = None
    app.state.tinker = TinkerService(settings, app.state.models, on_stored_gone=app.state.storage.delete)
    app.state.engine_lock = threading.Lock()
    app.state.readiness = ReadinessProbe()
    app.state.metrics = Metrics(settings, role=role, engine=lambda: app.state.engine)
    app.state.uploads = TenantSlots(
        limit=settings.max_uploads_per_tenant,
        what="uploads in progress",
        setting="TUNEFORGE_MAX_UPLOADS_PER_TENANT",
        code=ErrorCode.too_many_uploads,
    )
    app.state.tenant_threads = TenantThreads(per_tenant=2)  # generation requests' preparation, event stream polls
    app.state.streams = TenantSlots(
        limit=settings.max_event_streams_per_tenant,
        what="event streams open",
        setting="TUNEFORGE_MAX_EVENT_STREAMS_PER_TENANT",
        code=ErrorCode.too_many_streams,
    )
    install_error_handlers(app)

    def limit_for(method: str, path: str) -> tuple[int, AppError]:
        if method == "POST" and path.rstrip("/") == "/v1/files":
            return settings.max_upload_bytes + MULTIPART_OVERHEAD, upload_too_large(settings.max_upload_bytes)
        if method == "POST" and path == "/api/v1/forward_backward":
            return settings.tinker_max_request_bytes, request_too_large(settings.tinker_max_request_bytes)
        return settings.max_request_bytes, request_too_large(settings.max_request_bytes)

    def authenticate(authorization: str | None) -> Tenant:
        from app.auth.service import authenticate

        with session_scope(settings.db_url) as session:
            return authenticate(session, authorization=authorization)

    # Added last = runs first: the request id and access line, authentication, the body limit, then the routes.
    app.add_middleware(BodyLimitMiddleware, limit_for=limit_for)
    app.add_middleware(AuthenticationMiddleware, authenticate=authenticate)
    app.add_middleware(RequestContextMiddleware)

    _serve_docs_offline(app)
    app.include_router(health_router)
    app.include_router(metrics_router)
    if role == "api":
        app.include_router(files_router)
        app.include_router(jobs_router)
        app.include_router(fine_tuning_router)
        app.include_router(adapters_router)
        app.include_router(ui_router)
        app.include_router(webhooks_router)
        app.include_router(evals_router)
        app.include_router(sweeps_router)
        app.include_router(tinker_router)
        app.include_router(training_runs_router)
        app.include_router(hub_router)
    app.include_router(generation_router)
    app.include_router(openai_inference_router)
    app.include_router(models_router)
    return app


def _serve_docs_offline(app: FastAPI) -> None:
    """Swagger UI at /docs with its JavaScript and CSS from the `swagger-ui-bundle` package, not a CDN."""
    app.mount("/docs/assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} API",
            swagger_js_url="/docs/assets/swagger-ui-bundle.js",
            swagger_css_url="/docs/assets/swagger-ui.css",
            swagger_favicon_url="/docs/assets/favicon-32x32.png",
            oauth2_redirect_url=None,
        )
