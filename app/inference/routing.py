"""What the native and OpenAI generation routes share: the errors they answer, a generation streamed as events."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.sse import EventSourceResponse, format_sse_event

from app.core.errors import AppError, ErrorCode, ServiceUnavailable, error_responses
from app.core.metrics import Metrics
from app.core.sse import event_source_response
from app.inference import service
from app.inference.schemas import ResponseFormat
from app.ml.serving import Delta, GenerationEngine, GenerationResult

log = logging.getLogger(__name__)

ERROR_RESPONSES = error_responses(401, 404, 410, 413, 422, 429, 503)
STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or with `stream: true` server-sent events"}
}

# The events a piece of choice i's text becomes (none while it is held back); the one the choices' results become
# at the end (None: no event).
Chunk = Callable[[int, Delta], list[dict[str, Any]]]
Last = Callable[[list[GenerationResult]], dict[str, Any] | None]


def json_format(response_format: ResponseFormat | None) -> service.JsonFormat | None:
    """What `response_format` constrains the output to (None: nothing, plain text)."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.json_schema is None:
        return service.JsonFormat(schema=None, name="a JSON object", param="response_format")
    spec = response_format.json_schema
    return service.JsonFormat(
        schema=spec.json_schema, name=f"the JSON schema {spec.name!r}", param="response_format.json_schema.schema"
    )


def _event(data: dict[str, Any] | str) -> bytes:
    return format_sse_event(data_str=data if isinstance(data, str) else json.dumps(data))


async def _events(stream: service.Stream, chunk: Chunk, last: Last) -> AsyncIterator[bytes]:
    """Server-sent events: those of `chunk(i, delta)` for each delta of choice i, `last(results)` (unless None) at
    the end, then `[DONE]`; an error after the stream began is sent as an event in OpenAI's error shape."""
    try:
        async for item in stream:
            if isinstance(item, tuple):
                for event in chunk(*item):
                    yield _event(event)
            elif (final := last(item)) is not None:
                yield _event(final)
    except AppError as exc:  # OpenAI's shape: the client raises it as an APIError
        yield _event(exc.body())
    except Exception:  # a failure inside the engine: said without internals (the server's log has them)
        log.exception("a streamed generation failed")
        yield _event(
            ServiceUnavailable("the text could not be finished; try again", code=ErrorCode.server_error).body()
        )
    yield _event("[DONE]")


async def stream_response(
    engine: GenerationEngine,
    prepared: service.Prepared,
    metrics: Metrics,
    http: Request,
    chunk: Chunk,
    last: Last,
) -> EventSourceResponse:
    """The generation streamed, once its first text is there: an error before it is still an HTTP error status."""
    stream = service.Stream(engine, prepared, metrics, http.is_disconnected)
    await stream.first()
    return event_source_response(_events(stream, chunk, last))
