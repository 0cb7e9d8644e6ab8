"""HTTP routes for webhook endpoints (OpenAI's paths: the official client's `webhooks.*` call them)."""

from typing import Annotated

from fastapi import APIRouter, Path, status

from app.core.deps import SessionDep, SettingsDep, TenantDep
from app.core.errors import ErrorCode, InvalidInput, error_responses
from app.core.pagination import DEFAULT_LIMIT, AfterQuery, LimitQuery, ListPage
from app.webhooks import service
from app.webhooks.outbox import EVENT_TYPES
from app.webhooks.schemas import (
    EventTypeList,
    WebhookDeliveryObject,
    WebhookEndpointCreate,
    WebhookEndpointCreated,
    WebhookEndpointDeleted,
    WebhookEndpointObject,
    WebhookEndpointTest,
    WebhookEndpointTestResult,
    WebhookEndpointUpdate,
    WebhookSecretRotation,
)

router = APIRouter(prefix="/v1", tags=["webhooks"], responses=error_responses(401, 404, 422, 503))

EndpointId = Annotated[str, Path(max_length=64, description="A webhook endpoint's id (`webhook-…`)")]


@router.post(
    "/webhook_endpoints",
    status_code=status.HTTP_201_CREATED,
    responses=error_responses(409),
)
def create_webhook_endpoint(
    body: WebhookEndpointCreate, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> WebhookEndpointCreated:
    """Register a URL to receive this tenant's job events, signed with the secret in this answer (the only one
    that shows it). The URL's host is resolved: a private, loopback or link-local address is refused with 422
    `webhook_url_not_allowed` unless the operator allows them. 409 `too_many_webhook_endpoints` past the
    tenant's limit."""
    row = service.create_endpoint(
        session,
        settings=settings,
        tenant_id=tenant.id,
        url=body.url,
        events=body.events,
        event_types_=body.event_types,
        name=body.name,
    )
    return WebhookEndpointCreated.model_validate(row)


@router.get("/webhook_endpoints")
def list_webhook_endpoints(
    session: SessionDep, tenant: TenantDep, limit: LimitQuery = DEFAULT_LIMIT, after: AfterQuery = None
) -> ListPage[WebhookEndpointObject]:
    rows, has_more = service.list_endpoints(session, tenant_id=tenant.id, limit=limit, after=after)
    return ListPage(data=[WebhookEndpointObject.model_validate(row) for row in rows], has_more=has_more)


@router.get("/webhook_endpoints/{webhook_endpoint_id}")
def get_webhook_endpoint(
    webhook_endpoint_id: EndpointId, session: SessionDep, tenant: TenantDep
) -> WebhookEndpointObject:
    row = service.get_endpoint(session, tenant_id=tenant.id, endpoint_id=webhook_endpoint_id)
    return WebhookEndpointObject.model_validate(row)


@router.post("/webhook_endpoints/{webhook_endpoint_id}")
def update_webhook_endpoint(
    webhook_endpoint_id: EndpointId,
    body: WebhookEndpointUpdate,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
) -> WebhookEndpointObject:
    """Change the endpoint's URL (checked as at registration), events or name (OpenAI's `webhooks.update`);
    deliveries not yet sent go to the new URL. `updated_at` moves only when something changed."""
    row = service.update_endpoint(
        session,
        settings=settings,
        tenant_id=tenant.id,
        endpoint_id=webhook_endpoint_id,
        url=body.url,
        events=body.events,
        event_types_=body.event_types,
        name=body.name,
    )
    return WebhookEndpointObject.model_validate(row)


@router.post("/webhook_endpoints/{webhook_endpoint_id}/rotate_secret")
def rotate_webhook_secret(
    webhook_endpoint_id: EndpointId, session: SessionDep, tenant: TenantDep, body: WebhookSecretRotation | None = None
) -> WebhookEndpointCreated:
    """A new signing secret, shown in this answer only. With `keep_old_secret_active_for_24_hours`, each delivery
    carries a signature with the previous secret too for 24 hours (`webhook-signature` lists both)."""
    keep = body is not None and body.keep_old_secret_active_for_24_hours
    row = service.rotate_secret(session, tenant_id=tenant.id, endpoint_id=webhook_endpoint_id, keep_old=keep)
    return WebhookEndpointCreated.model_validate(row)


@router.post("/webhook_endpoints/{webhook_endpoint_id}/test")
def test_webhook_endpoint(
    webhook_endpoint_id: EndpointId,
    body: WebhookEndpointTest,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
) -> WebhookEndpointTestResult:
    """Send a sample event now (about a made-up job `ftjob-test…`), signed as every delivery; the receiver's HTTP
    status. 422 `webhook_unreachable` when it gives none (not reachable, or no answer in time)."""
    endpoint_id, result = service.test_endpoint(
        session, settings=settings, tenant_id=tenant.id, endpoint_id=webhook_endpoint_id, event_type=body.event_type
    )
    if result.status_code is None:
        raise InvalidInput(f"the endpoint did not answer: {result.error}", code=ErrorCode.webhook_unreachable)
    return WebhookEndpointTestResult(
        webhook_endpoint_id=endpoint_id, event_type=body.event_type, status_code=result.status_code
    )


@router.delete("/webhook_endpoints/{webhook_endpoint_id}")
def delete_webhook_endpoint(
    webhook_endpoint_id: EndpointId, session: SessionDep, tenant: TenantDep
) -> WebhookEndpointDeleted:
    """Delete the endpoint: nothing more is sent to it, and its deliveries' record goes with it."""
    deleted = service.delete_endpoint(session, tenant_id=tenant.id, endpoint_id=webhook_endpoint_id)
    return WebhookEndpointDeleted(id=deleted)


@router.get("/webhook_endpoints/{webhook_endpoint_id}/deliveries")
def list_webhook_deliveries(
    webhook_endpoint_id: EndpointId,
    session: SessionDep,
    tenant: TenantDep,
    limit: LimitQuery = DEFAULT_LIMIT,
    after: AfterQuery = None,
) -> ListPage[WebhookDeliveryObject]:
    """The events recorded for the endpoint, newest first, each with its attempts: `status` pending (retried),
    delivered or failed (the retry window closed), the last attempt's HTTP status or error, the next attempt."""
    rows, has_more = service.list_deliveries(
        session, tenant_id=tenant.id, endpoint_id=webhook_endpoint_id, limit=limit, after=after
    )
    return ListPage(data=[WebhookDeliveryObject.model_validate(row) for row in rows], has_more=has_more)


@router.get("/webhook_event_types")
def list_webhook_event_types(tenant: TenantDep) -> EventTypeList:
    """The events an endpoint may ask for."""
    return EventTypeList(data=list(EVENT_TYPES))
