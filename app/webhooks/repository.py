"""Queries on webhook endpoints (each scoped to a tenant) and on the outbox's deliveries (claims, attempts)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import case, delete, func, select, update
from sqlalchemy.orm import Session

from app.core.models import WebhookDelivery, WebhookEndpoint, db_now, utcnow
from app.core.pagination import newest_first


def count_endpoints(session: Session, *, tenant_id: str) -> int:
    query = select(func.count()).select_from(WebhookEndpoint).where(WebhookEndpoint.tenant_id == tenant_id)
    return int(session.scalar(query) or 0)


def get_endpoint(session: Session, *, tenant_id: str, endpoint_id: str) -> WebhookEndpoint | None:
    return session.scalar(
        select(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id, WebhookEndpoint.tenant_id == tenant_id)
    )


def list_endpoints(
    session: Session, *, tenant_id: str, limit: int, after: WebhookEndpoint | None
) -> tuple[list[WebhookEndpoint], bool]:
    query = select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == tenant_id)
    return newest_first(session, query, WebhookEndpoint, limit=limit, after=after)


def delete_endpoint(session: Session, *, tenant_id: str, endpoint_id: str) -> str | None:
    """Delete the tenant's endpoint (its deliveries go with it); its id, or None if it had none of that id."""
    query = (
        delete(WebhookEndpoint)
        .where(WebhookEndpoint.id == endpoint_id, WebhookEndpoint.tenant_id == tenant_id)
        .returning(WebhookEndpoint.id)
    )
    return session.scalars(query).one_or_none()


def get_delivery(session: Session, *, endpoint_id: str, delivery_id: str) -> WebhookDelivery | None:
    return session.scalar(
        select(WebhookDelivery).where(WebhookDelivery.id == delivery_id, WebhookDelivery.endpoint_id == endpoint_id)
    )


def list_deliveries(
    session: Session, *, endpoint_id: str, limit: int, after: WebhookDelivery | None
) -> tuple[list[WebhookDelivery], bool]:
    query = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id)
    return newest_first(session, query, WebhookDelivery, limit=limit, after=after)


# --- the delivery loop ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClaimedDelivery:
    """A delivery this sender holds for one attempt: what it sends, and the attempt its result is written for."""

    id: str
    url: str
    secrets: tuple[str, ...]  # each signs it: the endpoint's secret, and a rotated-out one still valid
    payload: str
    attempt: int


def signing_secrets(secret: str, previous: str | None, previous_expires_at: datetime | None) -> tuple[str, ...]:
    """The secrets a delivery is signed with now: the endpoint's, and the one before it while a rotation keeps it."""
    if previous is None or previous_expires_at is None or previous_expires_at <= utcnow():
        return (secret,)
    return (secret, previous)


def claim_due(session: Session, *, limit: int, lease_seconds: float) -> list[ClaimedDelivery]:
    """Take up to `limit` due deliveries for one attempt each: a conditional UPDATE per delivery (still pending,
    still due) moves its next attempt `lease_seconds` ahead and counts the attempt, so that no other sender takes
    it meanwhile (and one takes it again if this one dies without a word). Commit before sending."""
    due = session.scalars(
        select(WebhookDelivery.id)
        .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= db_now())
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)
    ).all()
    claimed = []
    for delivery_id in due:
        taken = session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery_id,
                WebhookDelivery.status == "pending",
                WebhookDelivery.next_attempt_at <= db_now(),
            )
            .values(
                attempts=WebhookDelivery.attempts + 1,
                next_attempt_at=db_now(lease_seconds),
                last_attempt_at=db_now(),
            )
        ).rowcount  # type: ignore[attr-defined]
        if taken != 1:  # another sender took it first
            continue
        row = session.execute(
            select(
                WebhookEndpoint.url,
                WebhookEndpoint.secret,
                WebhookEndpoint.previous_secret,
                WebhookEndpoint.previous_secret_expires_at,
                WebhookDelivery.payload,
                WebhookDelivery.attempts,
            )
            .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
            .where(WebhookDelivery.id == delivery_id)
        ).one()
        keys = signing_secrets(row.secret, row.previous_secret, row.previous_secret_expires_at)
        claimed.append(ClaimedDelivery(delivery_id, row.url, keys, row.payload, row.attempts))
    return claimed


def record_attempt(
    session: Session,
    delivery: ClaimedDelivery,
    *,
    delivered: bool,
    status_code: int | None,
    error: str | None,
    retry_in: float,
    retry_seconds: float,
) -> None:
    """Write how the claimed attempt went: delivered; or, failed, due again in `retry_in` seconds unless that is
    past `retry_seconds` after the event, which fails the delivery. Only for the attempt claimed (a sender that
    outlived its lease does not overwrite a later attempt's result)."""
    mine = (
        WebhookDelivery.id == delivery.id,
        WebhookDelivery.attempts == delivery.attempt,
        WebhookDelivery.status == "pending",
    )
    if delivered:
        values: dict[str, object] = {"status": "delivered", "delivered_at": db_now(), "last_error": None}
    else:
        window_closed = WebhookDelivery.created_at < db_now(retry_in - retry_seconds)
        values = {
            "status": case((window_closed, "failed"), else_="pending"),
            "next_attempt_at": db_now(retry_in),
            "last_error": error,
        }
    session.execute(update(WebhookDelivery).where(*mine).values(last_status_code=status_code, **values))
