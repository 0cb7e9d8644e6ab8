"""Request and response bodies of webhook endpoints and their deliveries: the shape the issue asks for (`events`,
`secret`) and, beside it, OpenAI's (`event_types`, `signing_secret`, `name`), so that the official `openai`
client's `webhooks.create/list/retrieve/delete` work unchanged."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

from app.core.schemas import Schema, UnixTime
from app.webhooks.addresses import MAX_URL_CHARS
from app.webhooks.outbox import EVENT_TYPES

MAX_NAME_CHARS = 200
EventName = Annotated[str, Field(max_length=64)]
EVENTS_DESCRIPTION = f"The events to send it, of {', '.join(EVENT_TYPES)}; left out: all of them"


class WebhookEndpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        max_length=MAX_URL_CHARS,
        description="An http(s) URL; its host must resolve to public addresses only (unless the operator allows "
        "private ones)",
    )
    events: list[EventName] | None = Field(default=None, max_length=len(EVENT_TYPES), description=EVENTS_DESCRIPTION)
    event_types: list[EventName] | None = Field(
        default=None, max_length=len(EVENT_TYPES), description="OpenAI's name for `events` (give one of the two)"
    )
    name: str | None = Field(default=None, max_length=MAX_NAME_CHARS, description="A name for people to read")


class WebhookEndpointUpdate(BaseModel):
    """What to change (OpenAI's `webhooks.update`): each field given replaces the endpoint's."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, max_length=MAX_URL_CHARS, description="As at registration")
    events: list[EventName] | None = Field(
        default=None, min_length=1, max_length=len(EVENT_TYPES), description="The complete set of events to send"
    )
    event_types: list[EventName] | None = Field(
        default=None, min_length=1, max_length=len(EVENT_TYPES), description="OpenAI's name for `events`"
    )
    name: str | None = Field(default=None, max_length=MAX_NAME_CHARS)


class WebhookSecretRotation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keep_old_secret_active_for_24_hours: bool = Field(
        default=False,
        description="Sign deliveries with the previous secret too for 24 hours (false: it is invalid at once)",
    )


class WebhookEndpointTest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    event_type: EventName = Field(description=f"The sample event to send: one of {', '.join(EVENT_TYPES)}")


class WebhookEndpointTestResult(BaseModel):
    object: Literal["webhook_endpoint.test"] = "webhook_endpoint.test"
    webhook_endpoint_id: str
    event_type: str
    status_code: int = Field(description="The receiver's HTTP status")
    success: Literal[True] = True


def secret_hint(secret: str) -> str:
    return f"whsec_…{secret[-4:]}"


class WebhookEndpointObject(Schema):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    name: str
    event_types: list[str] = Field(description="The events sent to it (OpenAI's name for `events`)")
    created_at: UnixTime
    updated_at: UnixTime = Field(description="Its last change of URL, events, name or secret")
    secret_value: str = Field(validation_alias="secret", exclude=True)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def events(self) -> list[str]:
        """The events sent to it."""
        return self.event_types

    @computed_field  # type: ignore[prop-decorator]
    @property
    def signing_secret_hint(self) -> str:
        """The secret's last characters, to tell secrets apart (the secret itself is shown only at creation)."""
        return secret_hint(self.secret_value)


class WebhookEndpointCreated(WebhookEndpointObject):
    """The endpoint with its signing secret: the answers to registering it and rotating its secret, the only ones
    that show it."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def secret(self) -> str:
        """`whsec_` + base64 of the key every delivery to this endpoint is signed with (Standard Webhooks)."""
        return self.secret_value

    @computed_field  # type: ignore[prop-decorator]
    @property
    def signing_secret(self) -> str:
        """The same secret, by OpenAI's name."""
        return self.secret_value


class WebhookEndpointDeleted(BaseModel):
    id: str
    object: Literal["webhook_endpoint.deleted"] = "webhook_endpoint.deleted"
    deleted: bool = True


class EventTypeList(BaseModel):
    object: Literal["list"] = "list"
    data: list[str]


class WebhookDeliveryObject(Schema):
    """One event for one endpoint and how sending it went."""

    id: str = Field(description="The `webhook-id` header, the same on every attempt")
    object: Literal["webhook_delivery"] = "webhook_delivery"
    endpoint_id: str
    event_type: str
    event: dict[str, Any] = Field(validation_alias="payload", description="The event as sent (the request body)")
    status: Literal["pending", "delivered", "failed"] = Field(
        description="pending: not yet answered 2xx, retried until the retry window closes; delivered; failed: the "
        "window closed"
    )
    attempts: int
    last_attempt_at: UnixTime | None
    last_status_code: int | None = Field(description="The receiver's HTTP status at the last attempt (none: no answer)")
    last_error: str | None = Field(description="Why the last attempt failed")
    next_attempt_at: UnixTime | None = Field(description="When it is tried next (pending only)")
    delivered_at: UnixTime | None
    created_at: UnixTime

    @model_validator(mode="before")
    @classmethod
    def _read_row(cls, row: Any) -> Any:
        if isinstance(row, dict):
            return row
        values = {name: getattr(row, name) for name in cls.model_fields if hasattr(row, name)}
        values["payload"] = json.loads(row.payload)
        if row.status != "pending":
            values["next_attempt_at"] = None
        return values
