"""Probes: `/healthz` says the process serves requests, `/readyz` that its dependencies answer."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel

from app.core.deps import SettingsDep, StorageDep
from app.core.readiness import CheckResult, ReadinessProbe

router = APIRouter(tags=["health"])


class Liveness(BaseModel):
    status: Literal["ok"] = "ok"


class ReadinessChecks(BaseModel):
    database: CheckResult
    broker: CheckResult
    object_store: CheckResult


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: ReadinessChecks


@router.get("/healthz", summary="Liveness: the process serves requests")
def healthz() -> Liveness:
    """Touches no dependency: a database or broker outage must not get a serving process restarted."""
    return Liveness()


@router.get(
    "/readyz",
    summary="Readiness: the database, the broker and the object store answer",
    response_model_exclude_none=True,
    responses={
        200: {"description": "Every dependency answers"},
        503: {"model": Readiness, "description": "A dependency does not answer; its check says why"},
    },
)
def readyz(request: Request, settings: SettingsDep, storage: StorageDep, response: Response) -> Readiness:
    """Answers within a few seconds even when a dependency hangs: that check then fails as "timed out".

    The checks run at most once a second per process; requests in between get the same answer.
    """
    probe: ReadinessProbe = request.app.state.readiness
    results = probe.results(settings, storage)
    ready = all(result.ok for result in results.values())
    if not ready:
        response.status_code = 503
    return Readiness(status="ready" if ready else "not_ready", checks=ReadinessChecks(**results))
