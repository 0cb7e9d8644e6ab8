"""A job's events as server-sent events: what is new, as it is written, until the job ends.

The stream polls the event log (`seq` orders a job's events and only grows), so a client that reconnects with
`Last-Event-ID: <seq>` gets exactly the events after it: nothing missed, nothing twice. Each poll uses its own
short database session in a worker thread; between polls the stream holds no connection and no thread. The key
the stream was opened with is checked again every KEY_CHECK_SECONDS: the stream ends once it is revoked (and a
reconnection is authenticated like any request).
"""

from __future__ import annotations

import asyncio
import json
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from anyio import to_thread
from fastapi.sse import format_sse_event
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.concurrency import Slot
from app.core.db import session_scope
from app.core.models import TERMINAL_STATUSES, ApiKey, Job
from app.jobs import repository
from app.jobs.schemas import EventObject

POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0  # a comment line, so that proxies do not close an idle stream
MAX_STREAM_SECONDS = 3600.0  # then the stream ends and the client reconnects with Last-Event-ID
BATCH = 500  # events read per poll
ENDED_GRACE_SECONDS = 1.0  # the stream stays this long after the job ended, for its last writes
KEY_CHECK_SECONDS = 5.0

T = TypeVar("T")


def sse(event: EventObject) -> bytes:
    """One event in the text/event-stream format: its seq as the id, its type as the event name."""
    data = json.dumps(event.model_dump(), separators=(",", ":"))
    return format_sse_event(id=str(event.seq), event=event.type, data_str=data)


def _poll(db_url: str, job_id: str, after_seq: int, key_hash: str | None) -> tuple[list[EventObject], bool] | None:
    """Events after `after_seq` (up to BATCH), and whether the job had ended before they were read; None when
    `key_hash` is given and no longer names an unrevoked key."""
    with session_scope(db_url) as session:
        if key_hash is not None and not _key_active(session, key_hash):
            return None
        job = session.get(Job, job_id)
        ended = job is None or job.status in TERMINAL_STATUSES  # read first: no event of an ended job can come after
        rows = repository.list_events(session, job_id=job_id, after_seq=after_seq, limit=BATCH)
        return [EventObject.model_validate(row) for row in rows], ended


async def _poll_in_thread(function: Callable[..., T], *args: Any) -> T:
    return await to_thread.run_sync(function, *args)


def _key_active(session: Session, key_hash: str) -> bool:
    query = select(ApiKey.id).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
    return session.scalar(query) is not None


async def event_stream(
    db_url: str,
    job_id: str,
    after_seq: int,
    is_disconnected: Callable[[], object],
    *,
    key_hash: str | None = None,
    poll: Callable[..., Awaitable[tuple[list[EventObject], bool] | None]] | None = None,
    poll_seconds: float = POLL_SECONDS,
    max_seconds: float = MAX_STREAM_SECONDS,
    key_check_seconds: float | None = None,
) -> AsyncIterator[bytes]:
    """The stream's text: every event after `after_seq`, then new ones as they come; it ends once the job has
    ended and its last event was sent, when the client goes away, when the key `key_hash` (the stream's) is
    revoked, or after `max_seconds`. `poll` runs each database poll in a worker thread (default: anyio's pool; the
    route passes its tenant's own threads)."""
    key_check_seconds = KEY_CHECK_SECONDS if key_check_seconds is None else key_check_seconds
    started = last_sent = key_checked = time.monotonic()
    ended_at: float | None = None
    yield format_sse_event(retry=int(poll_seconds * 2000))  # how long a client waits before it reconnects
    while time.monotonic() - started < max_seconds:
        check = key_hash if time.monotonic() - key_checked >= key_check_seconds else None
        polled = await (poll or _poll_in_thread)(_poll, db_url, job_id, after_seq, check)
        if polled is None:
            return  # the key was revoked
        if check is not None:
            key_checked = time.monotonic()
        events, ended = polled
        for event in events:
            yield sse(event)
            after_seq = event.seq
        if events:
            last_sent = time.monotonic()
            if len(events) == BATCH:
                continue  # more are waiting
        if ended:
            # Writes that follow the final status (the worker's "training stopped" after a cancel) get a moment.
            ended_at = ended_at or time.monotonic()
            if not events and time.monotonic() - ended_at >= ENDED_GRACE_SECONDS:
                return
        if await is_disconnected():  # type: ignore[misc]
            return
        if time.monotonic() - last_sent >= KEEPALIVE_SECONDS:
            yield format_sse_event(comment="keep-alive")
            last_sent = time.monotonic()
        await asyncio.sleep(poll_seconds)


async def released_after(events: AsyncIterator[bytes], slot: Slot) -> AsyncIterator[bytes]:
    """`events`, then `slot` released, however the stream ends (and if it never starts, once it is collected)."""
    weakref.finalize(events, slot.release)
    try:
        async for event in events:
            yield event
    finally:
        slot.release()
