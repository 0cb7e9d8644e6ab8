"""Webhook endpoints: register one (its URL checked, its secret made), change it, rotate its secret, send it a test
event, list, look up, delete; its deliveries."""

from __future__ import annotations

import base64
import secrets
import time
from datetime import timedelta

from sqlalchemy.orm import Session

from app.core.errors import Conflict, ErrorCode, InvalidInput, NotFound, clip
from app.core.ids import new_id
from app.core.models import WebhookDelivery, WebhookEndpoint, utcnow
from app.core.pagination import cursor_row
from app.core.settings import Settings
from app.core.usage import lock_tenant
from app.webhooks import repository
from app.webhooks.addresses import AddressRefused, parse_url, resolve
from app.webhooks.delivery import AttemptResult, send_now
from app.webhooks.outbox import EVENT_TYPES, event_body, new_delivery_id, new_event_id
from app.webhooks.repository import ClaimedDelivery, signing_secrets

# How long a rotation may keep the previous secret valid (OpenAI's `keep_old_secret_active_for_24_hours`).
PREVIOUS_SECRET_VALIDITY = timedelta(hours=24)


def new_secret() -> str:
    """`whsec_` + base64 of 32 random bytes: the form Standard Webhooks (and OpenAI) give signing secrets."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def check_url(url: str, *, settings: Settings) -> None:
    """A 422 naming `url` unless it is an http(s) URL whose host resolves to public addresses only (or the operator
    allows private ones). Resolving waits at most `webhook_timeout_seconds`."""
    try:
        resolve(
            parse_url(url),
            allow_private=settings.webhook_allow_private_urls,
            timeout=settings.webhook_timeout_seconds,
        )
    except AddressRefused as exc:
        code = ErrorCode.webhook_url_not_allowed if exc.private else ErrorCode.invalid_value
        raise InvalidInput(f"url: {exc}", param="url", code=code) from None


def event_types(events: list[str] | None, event_types: list[str] | None) -> list[str]:
    """The events asked for (by either name), each once, in the order given; all of them if neither is given."""
    if events is not None and event_types is not None:
        raise InvalidInput("events: give `events` or `event_types` (its OpenAI name), not both", param="events")
    asked = events if events is not None else event_types
    if asked is None:
        return list(EVENT_TYPES)
    if not asked:
        raise InvalidInput("events: name at least one event, or leave the field out for all", param="events")
    for name in asked:
        if name not in EVENT_TYPES:
            raise InvalidInput(f"events: unknown event {clip(name)}; one of {', '.join(EVENT_TYPES)}", param="events")
    return list(dict.fromkeys(asked))


def create_endpoint(
    session: Session,
    *,
    settings: Settings,
    tenant_id: str,
    url: str,
    events: list[str] | None,
    event_types_: list[str] | None,
    name: str | None,
) -> WebhookEndpoint:
    types = event_types(events, event_types_)
    check_url(url, settings=settings)  # before any query: no database connection is held while it resolves
    # The tenant's row stays locked until the endpoint is committed: two requests cannot both take the last place.
    lock_tenant(session, tenant_id)
    count = repository.count_endpoints(session, tenant_id=tenant_id)
    if count >= settings.webhook_max_endpoints_per_tenant:
        raise Conflict(
            f"this tenant has {count} webhook endpoints, its limit (TUNEFORGE_WEBHOOK_MAX_ENDPOINTS_PER_TENANT); "
            "delete one first",
            code=ErrorCode.too_many_webhook_endpoints,
        )
    row = WebhookEndpoint(
        id=new_id("webhook"), tenant_id=tenant_id, url=url, name=name or "", event_types=types, secret=new_secret()
    )
    session.add(row)
    session.flush()
    return row


def update_endpoint(
    session: Session,
    *,
    settings: Settings,
    tenant_id: str,
    endpoint_id: str,
    url: str | None,
    events: list[str] | None,
    event_types_: list[str] | None,
    name: str | None,
) -> WebhookEndpoint:
    """Change what is given of the URL (checked as at registration), the events and the name; `updated_at` moves
    only when something changed. Deliveries not yet sent go to the new URL."""
    types = event_types(events, event_types_) if events is not None or event_types_ is not None else None
    if url is not None:
        check_url(url, settings=settings)  # before any query: no database connection is held while it resolves
    row = get_endpoint(session, tenant_id=tenant_id, endpoint_id=endpoint_id)
    changed = False
    for field, value in (("url", url), ("event_types", types), ("name", name)):
        if value is not None and getattr(row, field) != value:
            setattr(row, field, value)
            changed = True
    if changed:
        row.updated_at = utcnow()
    session.flush()
    return row


def rotate_secret(session: Session, *, tenant_id: str, endpoint_id: str, keep_old: bool) -> WebhookEndpoint:
    """A new signing secret (shown in this answer only). With `keep_old`, deliveries are signed with the previous
    one too for 24 hours, so that receivers can switch without dropping one; otherwise it is invalid at once."""
    row = get_endpoint(session, tenant_id=tenant_id, endpoint_id=endpoint_id)
    now = utcnow()
    if keep_old:
        row.previous_secret, row.previous_secret_expires_at = row.secret, now + PREVIOUS_SECRET_VALIDITY
    else:
        row.previous_secret, row.previous_secret_expires_at = None, None
    row.secret = new_secret()
    row.updated_at = now
    session.flush()
    return row


def test_endpoint(
    session: Session, *, settings: Settings, tenant_id: str, endpoint_id: str, event_type: str
) -> tuple[str, AttemptResult]:
    """Send the endpoint a sample `event_type` event now (about a made-up job, `ftjob-test…`), signed as deliveries
    are; the endpoint's id and how the attempt went. Nothing is recorded: a test is not a delivery."""
    if event_type not in EVENT_TYPES:
        raise InvalidInput(
            f"event_type: unknown event {clip(event_type)}; one of {', '.join(EVENT_TYPES)}", param="event_type"
        )
    row = get_endpoint(session, tenant_id=tenant_id, endpoint_id=endpoint_id)
    sample = ClaimedDelivery(
        id=new_delivery_id(),
        url=row.url,
        secrets=signing_secrets(row.secret, row.previous_secret, row.previous_secret_expires_at),
        payload=event_body(new_event_id(), event_type, f"ftjob-test{secrets.token_hex(8)}", int(time.time())),
        attempt=1,
    )
    endpoint_id = row.id
    session.rollback()  # no connection held while the receiver answers
    return endpoint_id, send_now(sample, settings)


def get_endpoint(session: Session, *, tenant_id: str, endpoint_id: str) -> WebhookEndpoint:
    row = repository.get_endpoint(session, tenant_id=tenant_id, endpoint_id=endpoint_id)
    if row is None:
        raise NotFound(f"no webhook endpoint with id {clip(endpoint_id)}", param="webhook_endpoint_id")
    return row


def list_endpoints(
    session: Session, *, tenant_id: str, limit: int, after: str | None
) -> tuple[list[WebhookEndpoint], bool]:
    cursor = cursor_row(after, lambda id_: repository.get_endpoint(session, tenant_id=tenant_id, endpoint_id=id_))
    return repository.list_endpoints(session, tenant_id=tenant_id, limit=limit, after=cursor)


def delete_endpoint(session: Session, *, tenant_id: str, endpoint_id: str) -> str:
    """Delete the endpoint: nothing more is sent to it, and its deliveries (sent or not) go with it."""
    deleted = repository.delete_endpoint(session, tenant_id=tenant_id, endpoint_id=endpoint_id)
    if deleted is None:
        raise NotFound(f"no webhook endpoint with id {clip(endpoint_id)}", param="webhook_endpoint_id")
    return deleted


def list_deliveries(
    session: Session, *, tenant_id: str, endpoint_id: str, limit: int, after: str | None
) -> tuple[list[WebhookDelivery], bool]:
    endpoint = get_endpoint(session, tenant_id=tenant_id, endpoint_id=endpoint_id)
    cursor = cursor_row(after, lambda id_: repository.get_delivery(session, endpoint_id=endpoint.id, delivery_id=id_))
    return repository.list_deliveries(session, endpoint_id=endpoint.id, limit=limit, after=cursor)
