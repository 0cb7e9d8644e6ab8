"""The outbox: a job's end recorded as one delivery per subscribed endpoint, in the transaction of the change.

`app/jobs/state.py` calls `record_job_event` from `transition`, the one writer of `jobs.status`, so the event is
committed with the change or not at all; the delivery loops (app/webhooks/delivery.py) send it afterwards, from
whichever process finds it first. Once the transaction commits, this process's loops are woken at once.
"""

from __future__ import annotations

import json
import secrets
import threading
import time

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from app.core.db import after_commit
from app.core.models import Job, JobStatus, WebhookDelivery, WebhookEndpoint, db_now

# What Tuneforge sends, as OpenAI names them (the official `openai` client's `webhooks.unwrap` parses each).
JOB_EVENT_TYPES: dict[JobStatus, str] = {
    JobStatus.succeeded: "fine_tuning.job.succeeded",
    JobStatus.failed: "fine_tuning.job.failed",
    JobStatus.cancelled: "fine_tuning.job.cancelled",
}
EVENT_TYPES: tuple[str, ...] = tuple(JOB_EVENT_TYPES.values())


def new_event_id() -> str:
    return f"evt_{secrets.token_hex(16)}"


def new_delivery_id() -> str:
    """A delivery's id, sent as its `webhook-id` on every attempt (receivers drop a repeat by it)."""
    return f"wh_{secrets.token_hex(16)}"


def event_body(event_id: str, event_type: str, subject_id: str, created_at: int) -> str:
    """The event as OpenAI sends it: `{"id", "object": "event", "created_at", "type", "data": {"id"}}`."""
    event = {"id": event_id, "object": "event", "created_at": created_at, "type": event_type}
    return json.dumps({**event, "data": {"id": subject_id}}, separators=(",", ":"))


def record_job_event(session: Session, *, job_id: str, status: JobStatus) -> int:
    """Record the job's reaching `status` for each of its tenant's endpoints subscribed to that event (none for a
    status that is not an event); how many deliveries. Part of the caller's transaction."""
    event_type = JOB_EVENT_TYPES.get(status)
    if event_type is None:
        return 0
    tenant_id = session.scalar(select(Job.tenant_id).where(Job.id == job_id))
    endpoints = session.execute(
        select(WebhookEndpoint.id, WebhookEndpoint.event_types).where(WebhookEndpoint.tenant_id == tenant_id)
    ).all()
    subscribed = [endpoint_id for endpoint_id, types in endpoints if event_type in types]
    if not subscribed:
        return 0
    event_id = new_event_id()
    body = event_body(event_id, event_type, job_id, int(time.time()))
    for endpoint_id in subscribed:
        session.execute(
            insert(WebhookDelivery).values(
                id=new_delivery_id(),
                tenant_id=tenant_id,
                endpoint_id=endpoint_id,
                event_id=event_id,
                event_type=event_type,
                payload=body,
                status="pending",
                attempts=0,
                next_attempt_at=db_now(),
                created_at=db_now(),
            )
        )
    after_commit(session, wake_senders)
    return len(subscribed)


# The delivery loops of this process: woken once an event is committed, instead of at their next poll.
_wakeups: set[threading.Event] = set()
_wakeups_lock = threading.Lock()


def register_wakeup(event: threading.Event) -> None:
    with _wakeups_lock:
        _wakeups.add(event)


def unregister_wakeup(event: threading.Event) -> None:
    with _wakeups_lock:
        _wakeups.discard(event)


def wake_senders() -> None:
    with _wakeups_lock:
        for event in _wakeups:
            event.set()
