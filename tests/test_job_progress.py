"""Watching a job: its events streamed as server-sent events, its curves, its heartbeat and estimated finish."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.core.db import session_scope
from app.core.models import Job, JobStatus, utcnow
from app.core.settings import Settings
from app.jobs import streaming
from tests.conftest import Tenant
from tests.test_worker import events, start_job
from worker.runner import run_training_job


def parse_sse(text: str) -> list[dict[str, Any]]:
    """The events of a text/event-stream body: id, event and the JSON data of each (comments and retry skipped)."""
    out = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith(":") or ": " not in line:
                continue
            name, _, value = line.partition(": ")
            fields[name] = value
        if "data" in fields:
            out.append({"id": int(fields["id"]), "event": fields["event"], "data": json.loads(fields["data"])})
    return out


def stream(client: TestClient, tenant: Tenant, job_id: str, **headers: str) -> tuple[Any, list[dict[str, Any]]]:
    r = client.get(f"/jobs/{job_id}/events?stream=true", headers={**tenant.headers, **headers})
    return r, parse_sse(r.text)


@pytest.mark.slow  # the live stream test covers the stream in the fast tier
def test_a_finished_jobs_stream_sends_every_event_once_and_ends(
    client: TestClient, tenant: Tenant, settings: Settings
) -> None:
    job_id = start_job(client, tenant)
    run_training_job(settings, job_id)
    listed = events(client, tenant, job_id)

    r, streamed = stream(client, tenant, job_id)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert [e["data"] for e in streamed] == listed  # the same objects as the JSON list, in seq order
    assert [e["id"] for e in streamed] == [e["seq"] for e in listed]
    assert [e["event"] for e in streamed] == [e["type"] for e in listed]
    assert streamed[-1]["data"]["data"]["status"] == "succeeded"

    # Reconnecting after seq 5 (as a browser's EventSource does): exactly the rest, by header or by Accept.
    _, resumed = stream(client, tenant, job_id, **{"Last-Event-ID": "5"})
    assert [e["id"] for e in resumed] == [e["seq"] for e in listed if e["seq"] > 5]
    r = client.get(
        f"/jobs/{job_id}/events", headers={**tenant.headers, "Accept": "text/event-stream", "Last-Event-ID": "5"}
    )
    assert parse_sse(r.text) == resumed
    # Without streaming, the paginated JSON is as it was.
    assert client.get(f"/jobs/{job_id}/events?limit=2", headers=tenant.headers).json()["has_more"] is True


def test_a_live_stream_follows_the_job_until_it_ends(client: TestClient, tenant: Tenant, settings: Settings) -> None:
    job_id = start_job(client, tenant)  # queued: nothing trains it until the thread below does
    worker = threading.Timer(1.0, run_training_job, args=(settings, job_id))
    worker.start()
    started = time.monotonic()
    _, streamed = stream(client, tenant, job_id)
    worker.join()
    assert time.monotonic() - started > 1.0  # it waited for the training, which began after it connected
    listed = events(client, tenant, job_id)
    assert [e["data"] for e in streamed] == listed  # every event, once, in order
    statuses = [e["data"]["data"]["status"] for e in streamed if e["event"] == "status"]
    assert statuses == ["validating_files", "queued", "running", "succeeded"]
    assert any(e["event"] == "metrics" for e in streamed) and any(e["event"] == "eval" for e in streamed)


def test_streams_are_scoped_and_checked(client: TestClient, tenant: Tenant, make_tenant: Any) -> None:
    job_id = start_job(client, tenant)
    other = make_tenant()
    assert client.get(f"/jobs/{job_id}/events?stream=true", headers=other.headers).status_code == 404
    bad = client.get(f"/jobs/{job_id}/events?stream=true", headers={**tenant.headers, "Last-Event-ID": "x"})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "last-event-id"
    client.post(f"/jobs/{job_id}/cancel", headers=tenant.headers)
    _, streamed = stream(client, tenant, job_id)  # an ended job's stream ends at once
    assert streamed[-1]["data"]["data"]["status"] == "cancelled"


def test_a_stream_says_how_to_reconnect_keeps_quiet_connections_open_and_is_not_buffered(
    client: TestClient, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streaming, "KEEPALIVE_SECONDS", 0.0)  # a keep-alive comment at every quiet poll
    job_id = start_job(client, tenant)
    client.post(f"/jobs/{job_id}/cancel", headers=tenant.headers)
    r, streamed = stream(client, tenant, job_id)
    assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
    assert r.text.startswith("retry: 1000\n\n")  # an EventSource waits a second before it reconnects
    assert "\n\n: keep-alive\n\n" in r.text
    assert streamed[-1]["data"]["data"]["status"] == "cancelled"


def test_metrics_are_curves_of_step_and_value(client: TestClient, tenant: Tenant, settings: Settings) -> None:
    job_id = start_job(client, tenant, n_epochs=3, eval_every=2)
    run_training_job(settings, job_id)
    job = client.get(f"/jobs/{job_id}", headers=tenant.headers).json()
    body = client.get(f"/jobs/{job_id}/metrics", headers=tenant.headers).json()
    assert body["object"] == "fine_tuning.job.metrics" and body["job_id"] == job_id
    curves = body["curves"]
    steps = list(range(1, job["progress"]["total_steps"] + 1))
    assert [step for step, _ in curves["train_loss"]] == steps
    assert {name for name in curves} >= {"train_loss", "learning_rate", "valid_loss", "valid_perplexity"}
    evaluated = [e["data"] for e in events(client, tenant, job_id) if e["type"] == "eval"]
    assert curves["valid_loss"] == [[d["step"], d["valid_loss"]] for d in evaluated]
    thinned = client.get(f"/jobs/{job_id}/metrics?max_points=2", headers=tenant.headers).json()["curves"]
    assert thinned["train_loss"] == [curves["train_loss"][0], curves["train_loss"][-1]]
    assert client.get(f"/jobs/{job_id}/metrics?max_points=1", headers=tenant.headers).status_code == 422


def test_a_running_job_shows_its_heartbeat_and_estimated_finish(
    client: TestClient, tenant: Tenant, settings: Settings
) -> None:
    job_id = start_job(client, tenant)
    job = client.get(f"/jobs/{job_id}", headers=tenant.headers).json()
    assert job["heartbeat_at"] is None and job["estimated_finish"] is None
    with session_scope(settings.db_url) as session:  # as a worker leaves it: 4 of 10 steps done in 40 s
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                status=JobStatus.running,
                step=4,
                total_steps=10,
                started_at=utcnow() - timedelta(seconds=40),
                heartbeat_at=utcnow(),
            )
        )
    job = client.get(f"/jobs/{job_id}", headers=tenant.headers).json()
    now = time.time()
    assert abs(job["heartbeat_at"] - now) < 5
    assert abs(job["estimated_finish"] - (now + 60)) < 5  # 10 s a step, 6 steps to go
    # A resumed attempt's pace counts only its own steps: 4 steps since step 4 in 20 s, 2 to go.
    with session_scope(settings.db_url) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(step=8, started_at=utcnow() - timedelta(seconds=20), metrics={"resumed_from_step": 4})
        )
    job = client.get(f"/jobs/{job_id}", headers=tenant.headers).json()
    assert abs(job["estimated_finish"] - (time.time() + 10)) < 5
