"""`Idempotency-Key` on creating requests (`POST /v1/files`, `POST /jobs`), as Stripe and OpenAI clients send it:
a retried request with the same key returns what the first one created, never a duplicate.

A key is remembered per tenant and endpoint for KEY_TTL, in the same transaction as what it created. Two requests
with one key at the same moment: the primary key lets one commit; the other rolls back (its stored file is removed
with it) and returns the winner's resource. A job request reusing a key with another body is a 409. Expired keys
are swept (`sweep_expired_keys`, which every process's reaper thread runs).
"""

from __future__ import annotations

import hashlib
import logging
from datetime import timedelta
from typing import Annotated

from fastapi import Header
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.db import session_scope
from app.core.errors import Conflict, ErrorCode
from app.core.models import IdempotencyKey, utcnow

log = logging.getLogger(__name__)

KEY_TTL = timedelta(hours=24)

IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="Any unique string (e.g. a UUID): a retry with the same key returns what the first request "
        "created, for 24 hours",
    ),
]


def digest(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()


def find(session: Session, *, tenant_id: str, endpoint: str, key: str) -> IdempotencyKey | None:
    """The key's record, unless it has expired (then it is forgotten)."""
    row = session.get(IdempotencyKey, (tenant_id, endpoint, key))
    if row is not None and row.created_at < utcnow() - KEY_TTL:
        session.delete(row)
        session.flush()
        return None
    return row


def check_same_request(row: IdempotencyKey, request_sha256: str | None) -> None:
    if row.request_sha256 is not None and request_sha256 is not None and row.request_sha256 != request_sha256:
        raise Conflict(
            "this Idempotency-Key was used for another request; use a new key for a new request",
            param="Idempotency-Key",
            code=ErrorCode.idempotency_key_reused,
        )


def remember(
    session: Session, *, tenant_id: str, endpoint: str, key: str, resource_id: str, request_sha256: str | None
) -> None:
    session.add(
        IdempotencyKey(
            tenant_id=tenant_id, endpoint=endpoint, key=key, resource_id=resource_id, request_sha256=request_sha256
        )
    )


def commit_or_winner(session: Session, *, tenant_id: str, endpoint: str, key: str | None) -> str | None:
    """Commit the request's work; if a concurrent request with the same key committed first, roll this one back
    and return the id of what that one created (None when this one committed)."""
    try:
        session.commit()
        return None
    except IntegrityError:
        session.rollback()
        row = find(session, tenant_id=tenant_id, endpoint=endpoint, key=key) if key is not None else None
        if row is None:
            raise
        return row.resource_id


# Expired keys deleted per statement by `sweep_expired` (short transactions, whatever the backlog).
SWEEP_BATCH = 1000


def sweep_expired(session: Session, *, batch: int = SWEEP_BATCH) -> int:
    """Delete the oldest expired keys (older than KEY_TTL: `find` forgets them anyway), about `batch` of them
    (keys created at the same instant go together); returns how many. Call again while it returns `batch` or more."""
    cutoff = utcnow() - KEY_TTL
    expired = IdempotencyKey.created_at < cutoff
    newest = session.scalar(
        select(IdempotencyKey.created_at).where(expired).order_by(IdempotencyKey.created_at).offset(batch - 1).limit(1)
    )
    bound = IdempotencyKey.created_at <= newest if newest is not None else expired
    result = session.execute(delete(IdempotencyKey).where(expired, bound))
    return int(result.rowcount)  # type: ignore[attr-defined]


def sweep_expired_keys(db_url: str) -> int:
    """Every expired key deleted, a batch per transaction; how many. Never raises (the reaper thread calls it each
    round: a database that is away is swept next time)."""
    swept = 0
    try:
        while True:
            with session_scope(db_url) as session:
                deleted = sweep_expired(session)
            swept += deleted
            if deleted < SWEEP_BATCH:
                return swept
    except Exception as exc:
        log.warning("expired idempotency keys not swept (%s); the next round tries again", type(exc).__name__)
        return swept
