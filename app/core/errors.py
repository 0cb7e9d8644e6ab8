"""Typed domain errors and the one handler that renders them as JSON."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from app.core.error_codes import ErrorCode

log = logging.getLogger(__name__)

# An error message never grows with the input it complains about: echoed values are cut, and so is the whole.
MAX_ECHO_CHARS = 64
MAX_MESSAGE_CHARS = 2000


def _printable(text: str) -> str:
    """Text that can be sent as UTF-8: an unpaired surrogate (a JSON escape in a request) becomes `\\udXXX`."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def clip(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """`repr` of a user-supplied value for an error message, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 1]}…' ({len(text) - 2} characters)"


class FieldError(ValueError):
    """A request model's validator's error about one field (such errors have no location of their own): `param`
    names the field in the error the client gets, whose message is `param: message`."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class AppError(Exception):
    status_code = 400
    type = "invalid_request_error"
    code = ErrorCode.invalid_request

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: ErrorCode | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 1] + "…"
        message = _printable(message)
        super().__init__(message)
        self.message = message
        self.param = _printable(param) if param is not None else None
        if code is not None:
            self.code = code
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "type": self.type,
            "message": self.message,
            "param": self.param,
            "code": self.code,
        }
        error.update(self.extra)
        return {"error": error}

    def headers(self) -> dict[str, str] | None:
        return {"WWW-Authenticate": "Bearer"} if self.status_code == 401 else None

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status_code, content=self.body(), headers=self.headers())


class InvalidInput(AppError):
    status_code = 422
    code = ErrorCode.invalid_value


class Forbidden(AppError):
    status_code = 403


class NotFound(AppError):
    status_code = 404
    code = ErrorCode.not_found


class Conflict(AppError):
    status_code = 409
    code = ErrorCode.conflict


class Gone(AppError):
    status_code = 410
    code = ErrorCode.gone


class PayloadTooLarge(AppError):
    status_code = 413
    code = ErrorCode.file_too_large


class RequestTimeout(AppError):
    """408: the client sent its request too slowly; the request did nothing and may be sent again."""

    status_code = 408


class TooManyRequests(AppError):
    """429: a limit the client may retry against later, after `retry_after` seconds (the Retry-After header)."""

    status_code = 429
    code = ErrorCode.rate_limited

    def __init__(self, message: str, *, retry_after: int, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.retry_after)}


class ServiceUnavailable(AppError):
    status_code = 503
    type = "server_error"
    code = ErrorCode.unavailable


class DatabaseUnavailable(ServiceUnavailable):
    """503 while the database does not answer: nothing was changed, the request can be sent again."""

    code = ErrorCode.database_unavailable
    RETRY_AFTER = 5

    def __init__(self) -> None:
        super().__init__("the database is unreachable right now; nothing was changed, try again shortly")

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.RETRY_AFTER)}


# The database is unreachable, or every pooled connection stayed busy for the pool's timeout (not a bad query).
DATABASE_ERRORS = (OperationalError, InterfaceError, PoolTimeout)


class Unauthorized(AppError):
    status_code = 401
    type = "authentication_error"
    code = ErrorCode.invalid_api_key


class RequestTooLarge(StarletteHTTPException):
    """Raised while a body streams in, once it passes its limit; rendered as the `error` it carries (a 413).

    An HTTPException, so that FastAPI's body parsing re-raises it instead of turning it into a 400.
    """

    def __init__(self, error: AppError) -> None:
        super().__init__(status_code=error.status_code, detail=error.message)
        self.error = error


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")  # a rejected upload's `report`

    type: str
    message: str
    param: str | None
    code: str


class ErrorBody(BaseModel):
    """Every error answer: `{"error": {"type", "message", "param", "code"}}` (a rejected upload adds `report`)."""

    error: ErrorDetail


_ERROR_DESCRIPTIONS = {
    401: "Missing, malformed, unknown or revoked API key",
    403: "A limit of the tenant that waiting does not lift (stored bytes)",
    404: "No such resource for this tenant",
    408: "The request body came in slower than the service's minimum rate",
    409: "The resource's state does not allow this",
    410: "The resource's stored files are missing or damaged",
    413: "The request body is larger than its limit",
    422: "A field is invalid; `param` names it",
    429: "A limit was reached; try again after the `Retry-After` header's seconds",
    503: "A service the request needs is unreachable",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses, all with the error body."""
    return {status: {"model": ErrorBody, "description": _ERROR_DESCRIPTIONS[status]} for status in statuses}


def _error_response(
    status: int,
    type_: str,
    message: str,
    param: str | None,
    code: ErrorCode,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={"error": {"type": type_, "message": message, "param": param, "code": code}},
        headers={"WWW-Authenticate": "Bearer"} if status == 401 else headers,
    )


def _allowed_methods(request: Request) -> list[str]:
    path = request.url.path
    methods: set[str] = set()
    for route in request.app.routes:
        if isinstance(route, Route) and route.path_regex.match(path):
            methods.update(route.methods or ())
    return sorted(methods)


def _loc_to_param(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "form", "header")]
    return ".".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def _app_error(_: Request, exc: AppError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    @app.exception_handler(PoolTimeout)
    async def _database_unavailable(_: Request, exc: Exception) -> JSONResponse:
        log.warning("database unreachable: %s", type(exc).__name__)
        return DatabaseUnavailable().response()

    @app.exception_handler(RequestTooLarge)
    async def _too_large(_: Request, exc: RequestTooLarge) -> JSONResponse:
        return exc.error.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "invalid"}
        param = _loc_to_param(tuple(first.get("loc", ())))
        msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        context = first.get("ctx")
        raised = context.get("error") if isinstance(context, dict) else None
        if isinstance(raised, FieldError):
            param, msg = raised.param, str(raised)
        message = f"{param}: {msg}" if param else msg
        if len(errors) > 1:
            others = "; ".join(f"{_loc_to_param(tuple(e.get('loc', ())))}: {e.get('msg')}" for e in errors[1:5])
            message = f"{message} (also: {others})"
        code = ErrorCode.missing_field if first.get("type") == "missing" else ErrorCode.invalid_value
        return _error_response(422, "invalid_request_error", message, param or None, code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            # FastAPI's answer to a body that is not UTF-8 JSON: a 422 like every other malformed body.
            return _error_response(
                422, "invalid_request_error", "the request body is not valid UTF-8 JSON", None, ErrorCode.invalid_json
            )
        code = {404: ErrorCode.not_found, 405: ErrorCode.method_not_allowed}.get(exc.status_code, ErrorCode.http_error)
        headers = exc.headers
        if exc.status_code == 405:  # RFC 9110: `Allow` lists every method of the path, not only one route's
            headers = {"Allow": ", ".join(_allowed_methods(request))}
        return _error_response(exc.status_code, "invalid_request_error", str(exc.detail), None, code, headers)

    @app.exception_handler(Exception)
    async def _unhandled(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return internal_error_response()


def internal_error_response() -> JSONResponse:
    """What a client sees of an unexpected error: that it happened, nothing of it."""
    return _error_response(500, "server_error", "internal server error", None, ErrorCode.internal_error)
