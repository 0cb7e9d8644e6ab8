"""Property-based test of the whole HTTP API from its OpenAPI document (schemathesis): no input gets a 5xx,
and every answer matches what the document says (status codes, content types, bodies).

Runs on both backends; bounded (a few examples per operation) to fit in CI. Slow, and costly even to collect
(hypothesis strategies for every operation, in every test process): the fast tier does not collect this module
(`make test-fast`).
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
from schemathesis.generation import GenerationMode
from schemathesis.generation.meta import TestPhase
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
# The document as the app writes it, read without serving it: serving it would start the app's lifespan (its
# background loops, against a database never migrated) while the test modules are still being collected, and
# Python 3.11's compiler is not safe against another thread compiling at the same time (pytest rewrites each test
# module's AST: "SystemError: AST constructor recursion depth mismatch").
schema = schemathesis.openapi.from_dict(_document_app.openapi())
schema.app = current
schema.location = "/openapi.json"
# Tinker's forward/backward body is protobuf: sent as the binary bodies are (any bytes, which must be refused
# cleanly unless they parse).
schemathesis.serializer.alias("application/x-protobuf", "application/octet-stream")
# An invalid request may also be refused for its size (413): every body has a limit.
schema.config.checks.negative_data_rejection.expected_statuses = [
    *schema.config.checks.negative_data_rejection.expected_statuses,
    "413",
]


def is_negative_coverage(case: Any) -> bool:
    meta = case.meta
    return bool(
        meta is not None and meta.phase.name == TestPhase.COVERAGE and meta.generation.mode == GenerationMode.NEGATIVE
    )


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
def test_no_input_gets_a_server_error(case: Any, app_under_test: None, tenant: Tenant, backend: str) -> None:
    if backend != "embedded" and is_negative_coverage(case):
        # The coverage phase's invalid inputs (each field past each bound: two thirds of the requests) are refused by
        # the same request validation on either backend, before any storage: sent once, on the embedded one. Valid
        # inputs, which reach the database and the queue, and the generated invalid ones go to both.
        return
    case.call_and_validate(
        headers={"Authorization": f"Bearer {tenant.key}"},
        # Schema-valid is not always acceptable: ids that do not exist, both `prompt` and `messages`, a prompt
        # longer than the model's context are 4xx by design. Every other default check applies.
        excluded_checks=[positive_data_acceptance],
        # A schema-valid /generate may ask for hundreds of tokens: seconds on a quiet machine, more on a busy one.
        timeout=120,
    )
