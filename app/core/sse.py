"""Server-sent event responses: FastAPI's `EventSourceResponse`, for routes that check before their stream begins."""

from __future__ import annotations

from collections.abc import AsyncIterable

from fastapi.sse import EventSourceResponse

# What FastAPI's own SSE routes send with the stream: no caching, and no buffering by a proxy (nginx) in front.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event_source_response(events: AsyncIterable[bytes]) -> EventSourceResponse:
    """`events`, each made by `fastapi.sse.format_sse_event`, as FastAPI's SSE response with FastAPI's headers.

    Returned from a normal route rather than a generator route (`response_class=EventSourceResponse`): a generator
    route has sent its 200 before its body runs, and these routes answer an error status (a 404, a 429, a bad
    prompt) when a check before the first event fails, or answer JSON instead of a stream.
    """
    return EventSourceResponse(events, headers=SSE_HEADERS)
