"""Property-based test of the whole HTTP API from its OpenAPI document (schemathesis): no input gets a 5xx,
and every answer matches what the document says (status codes, content types, bodies).

Runs on both backends; bounded (a few examples per operation) to fit in CI.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase
from hypothesis import settings as hypothesis_settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from app.core.settings import Settings
from app.main import create_app
from tests.conftest import Tenant


class CurrentApp:
    """An ASGI app that forwards to the app of the backend under test (the document is the same for both)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


_document_app = create_app(Settings(data_dir=Path(tempfile.mkdtemp(prefix="tuneforge-openapi-"))))
current = CurrentApp(_document_app)
schema = schemathesis.openapi.from_asgi("/openapi.json", current)
# An invalid request may also be refused for its size (413): every body has a limit.
schema.config.checks.negative_data_rejection.expected_statuses = [
    *schema.config.checks.negative_data_rejection.expected_statuses,
    "413",
]


@pytest.fixture
def app_under_test(settings: Settings) -> Iterator[None]:
    current.app = create_app(settings)
    yield
    current.app = _document_app


@pytest.mark.slow  # hypothesis runs hundreds of requests per operation
@schema.parametrize()
@hypothesis_settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate],
)
def test_no_input_gets_a_server_error(case: Any, app_under_test: None, tenant: Tenant) -> None:
    case.call_and_validate(
        headers={"Authorization": f"Bearer {tenant.key}"},
        # Schema-valid is not always acceptable: ids that do not exist, both `prompt` and `messages`, a prompt
        # longer than the model's context are 4xx by design. Every other default check applies.
        excluded_checks=[positive_data_acceptance],
        # A schema-valid /generate may ask for hundreds of tokens: seconds on a quiet machine, more on a busy one.
        timeout=120,
    )


def _unbounded(schema: dict[str, Any], components: dict[str, Any], where: str) -> list[str]:
    """Places in a request schema that accept values of any size: a string without maxLength, a number without
    a maximum, an array without maxItems, an object open to any keys."""
    if "$ref" in schema:
        return _unbounded(components[schema["$ref"].rsplit("/", 1)[-1]], components, where)
    found: list[str] = []
    for key in ("anyOf", "oneOf", "allOf"):
        for i, sub in enumerate(schema.get(key, [])):
            found += _unbounded(sub, components, f"{where}|{i}")
    kind = schema.get("type")
    if "enum" in schema or "const" in schema or kind in ("boolean", "null"):
        return found
    if kind == "string" and "maxLength" not in schema and schema.get("format") != "binary":
        found.append(where)
    if kind in ("integer", "number") and "maximum" not in schema and "exclusiveMaximum" not in schema:
        found.append(where)
    if kind == "array":
        if "maxItems" not in schema:
            found.append(where)
        found += _unbounded(schema.get("items", {}), components, f"{where}[]")
    if kind == "object":
        extra = schema.get("additionalProperties", True)
        if isinstance(extra, dict) and "maxProperties" in schema and "maxLength" in schema.get("propertyNames", {}):
            found += _unbounded(extra, components, f"{where}{{}}")  # a bounded map: a few short keys
        elif extra is not False and "anyOf" not in schema:
            found.append(where)
        for name, sub in schema.get("properties", {}).items():
            found += _unbounded(sub, components, f"{where}.{name}")
    return found


def test_every_request_field_is_bounded_in_the_api_document() -> None:
    """A new endpoint or field that accepts values of any size fails here, before it ships."""
    document = _document_app.openapi()
    components = document["components"]["schemas"]
    unbounded: list[str] = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for parameter in operation.get("parameters", []):
                unbounded += _unbounded(parameter["schema"], components, f"{method} {path} {parameter['name']}")
            for media, body in operation.get("requestBody", {}).get("content", {}).items():
                unbounded += _unbounded(body["schema"], components, f"{method} {path} {media}")
    assert unbounded == []
