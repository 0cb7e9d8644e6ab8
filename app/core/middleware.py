"""ASGI middleware that runs before any route reads a body: authentication first, then body-size limits.

Both are pure ASGI (not `BaseHTTPMiddleware`) so that nothing buffers the body: a request without a valid
key is answered 401 before one byte of its body is read, and a body is counted as it streams in (with or
without a `Content-Length`) and refused with 413 the moment it passes its route's limit. Around both, the
request's id for the logs and its access line.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import anyio
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.errors import (
    DATABASE_ERRORS,
    AppError,
    DatabaseUnavailable,
    ErrorCode,
    PayloadTooLarge,
    RequestTooLarge,
    Unauthorized,
    internal_error_response,
)
from app.core.logging import request_id_var, sane_request_id

access_log = logging.getLogger("tuneforge.access")

# Paths that answer without an API key: liveness/readiness probes, the API documentation and the dashboard's
# page and assets (the page asks for the key and sends it with each API call), and the Prometheus metrics (which
# check TUNEFORGE_METRICS_TOKEN themselves when it is set).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json", "/docs", "/ui", "/metrics"})
PUBLIC_PREFIXES = ("/docs/assets/", "/ui/", "/hf/")  # /hf: the models' tokenizers, read-only (app/tinker/hub.py)


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


# Polled every few seconds by probes and Prometheus: their access lines are DEBUG, not INFO.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class RequestContextMiddleware:
    """Give each request an id, the client's `X-Request-ID` when it is a sane one (else a new one), that every line
    logged while it is handled carries and the response returns in `X-Request-ID`; then log its access line
    (method, path, status, duration), in place of uvicorn's, which cannot know the id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = sane_request_id(_header(scope, b"x-request-id")) or uuid.uuid4().hex
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500  # if the app raises before it answers, the server answers 500

        started_response = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                status, started_response = message["status"], True
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # The 500 is sent from here, with the id (the server's error handler, outside, then only logs it).
            if not started_response:
                await internal_error_response()(scope, receive, send_with_id)
            raise
        finally:
            method, path = scope["method"], scope["path"]
            duration_ms = round(1000 * (time.perf_counter() - started), 1)
            access_log.log(
                logging.DEBUG if path in PROBE_PATHS else logging.INFO,
                "%s %s %d %.1f ms",
                method,
                path,
                status,
                duration_ms,
                extra={"method": method, "path": path, "status": status, "duration_ms": duration_ms},
            )
        # Reset only after a normal end: the server logs an exception that escapes the app in this same task,
        # and that line should carry the request's id too (every request runs in a task, a context, of its own).
        request_id_var.reset(token)


TINKER_PREFIX = "/api/v1/"  # Tinker's routes (app/tinker/): the official client's own header and key form
TINKER_KEY_PREFIX = "tml-"


def _credential(scope: Scope) -> str | None:
    """The request's `Authorization` value; on Tinker's routes, `X-API-Key: tml-<key>` (what the official tinker
    client sends: it refuses keys without the `tml-` prefix) read as `Bearer <key>`."""
    if not scope["path"].startswith(TINKER_PREFIX):
        return _header(scope, b"authorization")
    key = _header(scope, b"x-api-key")
    if key is None:
        raise Unauthorized("missing API key: send 'X-API-Key: tml-<Tuneforge key>'", code=ErrorCode.missing_api_key)
    if not key.startswith(TINKER_KEY_PREFIX):
        raise Unauthorized("malformed X-API-Key: expected 'tml-' and a Tuneforge key")
    return f"Bearer {key.removeprefix(TINKER_KEY_PREFIX)}"


class AuthenticationMiddleware:
    """Resolve `Authorization: Bearer <key>` (Tinker's routes: `X-API-Key: tml-<key>`) to a tenant (in
    `scope["state"]["tenant"]`) or answer 401."""

    def __init__(self, app: ASGIApp, *, authenticate: Callable[[str | None], Any]) -> None:
        self.app = app
        self.authenticate = authenticate  # blocking (a database lookup): run in a worker thread

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_public(scope["path"]):
            await self.app(scope, receive, send)
            return
        try:
            tenant = await anyio.to_thread.run_sync(self.authenticate, _credential(scope))
        except Unauthorized as exc:
            await exc.response()(scope, receive, send)
            return
        except DATABASE_ERRORS:
            await DatabaseUnavailable().response()(scope, receive, send)
            return
        scope.setdefault("state", {})["tenant"] = tenant
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse a body larger than its route's limit: at once from `Content-Length`, else while it streams."""

    def __init__(self, app: ASGIApp, *, limit_for: Callable[[str, str], tuple[int, AppError]]) -> None:
        self.app = app
        self.limit_for = limit_for  # (method, path) -> (limit in bytes, the error to answer past it)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, error = self.limit_for(scope["method"], scope["path"])
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await error.response()(scope, receive, send)
            return
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise RequestTooLarge(error)
            return message

        response_started = False

        async def tracked_send(message: Message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except RequestTooLarge as exc:  # read outside the app's exception handlers (a background read, say)
            if response_started:
                raise
            await exc.error.response()(scope, receive, send)


def request_too_large(max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"request body is larger than the limit of {max_bytes} bytes", param=None, code=ErrorCode.request_too_large
    )
