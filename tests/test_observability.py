"""Observability: `/metrics` in Prometheus's format (jobs, queue depth, training speed, generation, adapter cache)
and JSON log lines carrying request and job ids, in-process and from the real `tuneforge api` and `worker`."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from sqlalchemy import func, select, update
from sqlalchemy.exc import OperationalError

from app.core.db import migrate, session_scope
from app.core.logging import job_logging_context, make_handler, request_id_var
from app.core.metrics import queue_depths
from app.core.models import Job, JobStatus, utcnow
from app.core.queue import cuda_queue
from app.core.settings import Settings, get_settings
from app.main import create_app
from tests.conftest import Tenant, chat_lines, embedded_settings, free_port, jsonl, upload
from tests.test_e2e import TUNEFORGE, stop, wait_healthy
from tests.test_jobs import queued_messages
from tests.test_worker import start_job
from worker import lifecycle
from worker.runner import run_training_job

embedded_only = pytest.mark.parametrize("backend", ["embedded"], indirect=True)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(client: TestClient, **headers: str) -> Samples:
    """Every sample of GET /metrics, parsed by Prometheus's own parser: {(name, sorted labels): value}."""
    r = client.get("/metrics", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def create_job(client: TestClient, tenant: Tenant, file_id: str, **headers: str) -> httpx.Response:
    return client.post(
        "/jobs",
        headers={**tenant.headers, **headers},
        json={"base_model": "tiny-random-llama", "training_file": file_id, "hyperparameters": {"n_epochs": 1}},
    )


@pytest.fixture
def json_log() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """The app's JSON handler (formatter and id filter) on the root logger at INFO; returns the lines parsed."""
    buffer = io.StringIO()
    handler = make_handler("json", buffer)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield lambda: [json.loads(line) for line in buffer.getvalue().splitlines()]
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


# --- /metrics -----------------------------------------------------------------------------------------------------
@embedded_only  # a database of its own: the counts are this test's alone
def test_metrics_count_jobs_by_state_as_the_database_does_and_sum_live_training_speed(
    client: TestClient, tenant: Tenant, settings: Settings
) -> None:
    file_id = upload(client, tenant, jsonl(chat_lines(8))).json()["id"]
    queued, cancelled, live, stale = (create_job(client, tenant, file_id).json()["id"] for _ in range(4))
    assert client.post(f"/jobs/{cancelled}/cancel", headers=tenant.headers).status_code == 200
    # Two jobs running as a worker runs them, each reporting its speed; one worker then stops answering.
    for job_id, speed in ((live, 250.0), (stale, 100.0)):
        claimed = lifecycle.claim(settings, job_id)
        assert claimed is not None
        lifecycle.JobReporter(settings.db_url, claimed).progress(
            step=1, total_steps=2, epoch=0, metrics={"tokens_per_second": speed}, message="step 1/2"
        )
    with session_scope(settings.db_url) as session:
        session.execute(
            update(Job)
            .where(Job.id == stale)
            .values(heartbeat_at=utcnow() - timedelta(seconds=settings.heartbeat_timeout_seconds + 60))
        )

    samples = scrape(client)

    with session_scope(settings.db_url) as session:
        in_db = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
    assert in_db == {JobStatus.queued: 1, JobStatus.cancelled: 1, JobStatus.running: 2}
    for status in JobStatus:
        assert sample(samples, "tuneforge_jobs", state=status.value) == in_db.get(status, 0), status
    assert sample(samples, "tuneforge_training_tokens_per_second") == 250.0  # the stale job's worker is gone
    assert queued  # still waiting on the broker, with the others' messages (see the queue depth test)


@pytest.mark.parametrize("backend", ["embedded", "production"], indirect=True)
def test_queue_depth_counts_the_jobs_waiting_on_the_broker(
    client: TestClient, tenant: Tenant, settings: Settings
) -> None:
    before = scrape(client)
    assert sample(before, "tuneforge_queue_depth", queue=settings.queue_name) == 0
    file_id = upload(client, tenant, jsonl(chat_lines(8))).json()["id"]
    for _ in range(2):
        assert create_job(client, tenant, file_id).status_code == 201

    samples = scrape(client)

    waiting = len(queued_messages(settings))  # read from Redis or the SQLite broker directly
    assert waiting == 2
    assert sample(samples, "tuneforge_queue_depth", queue=settings.queue_name) == waiting
    assert sample(samples, "tuneforge_queue_depth", queue=cuda_queue(settings.queue_name)) == 0


@embedded_only
def test_metrics_answer_without_a_broker_and_leave_its_queue_depth_out(settings: Settings, tenant: Tenant) -> None:
    unreachable = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(unreachable)) as client:
        samples = scrape(client)
    assert "tuneforge_queue_depth" not in names(samples)
    assert sample(samples, "tuneforge_jobs", state="queued") == 0  # the rest is there


@embedded_only
def test_a_metrics_token_when_set_is_the_only_way_in(settings: Settings, tenant: Tenant) -> None:
    guarded = settings.model_copy(update={"metrics_token": SecretStr("scrape-secret")})
    with TestClient(create_app(guarded)) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=tenant.headers).status_code == 401  # an API key is not the token
        refused = client.get("/metrics", headers={"Authorization": "Bearer scrape-secret-not"})
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
        assert "tuneforge_jobs" in names(scrape(client, Authorization="Bearer scrape-secret"))
        assert "/metrics" not in client.get("/openapi.json").json()["paths"]  # for Prometheus, not API clients
    with TestClient(create_app(settings)) as client:  # unset: public, like /healthz
        assert "tuneforge_jobs" in names(scrape(client))


@embedded_only
def test_generation_latency_tokens_and_adapter_cache_hits_and_misses(
    client: TestClient, tenant: Tenant, settings: Settings
) -> None:
    lines = [json.dumps({"prompt": "The secret word is", "completion": " plum"})] * 8
    adapter_id = run_training_job(settings, start_job(client, tenant, lines, n_epochs=1))
    assert adapter_id is not None
    before = scrape(client)
    assert sample(before, "tuneforge_generation_latency_seconds_count", stream="false") == 0
    assert sample(before, "tuneforge_adapter_cache_misses_total", tier="device") == 0

    usages = []
    for stream in (False, False, True):  # one adapter, three requests: loaded once, then found on the device
        r = client.post(
            "/generate",
            headers=tenant.headers,
            json={"adapter_id": adapter_id, "prompt": "The secret word is", "max_tokens": 3, "stream": stream},
        )
        assert r.status_code == 200, r.text
        if stream:
            events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
            usages.append(events[-1]["usage"])
        else:
            usages.append(r.json()["usage"])

    after = scrape(client)
    assert sample(after, "tuneforge_generation_latency_seconds_count", stream="false") == 2
    assert sample(after, "tuneforge_generation_latency_seconds_count", stream="true") == 1
    assert sample(after, "tuneforge_generation_latency_seconds_sum", stream="false") > 0
    assert sample(after, "tuneforge_generation_completion_tokens_total") == sum(u["completion_tokens"] for u in usages)
    assert sample(after, "tuneforge_generation_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert sample(after, "tuneforge_generation_requests_total", finish_reason="length") == 3
    assert sample(after, "tuneforge_adapter_cache_misses_total", tier="device") == 1
    assert sample(after, "tuneforge_adapter_cache_hits_total", tier="device") == 2
    assert sample(after, "tuneforge_adapter_cache_misses_total", tier="disk") == 1  # downloaded once
    assert sample(after, "tuneforge_adapter_cache_bytes", tier="device") > 0

    # A serving replica has the same generation metrics; the deployment's jobs and queue are the API's to report.
    with TestClient(create_app(settings, role="serve")) as replica:
        served = names(scrape(replica))
    assert {"tuneforge_adapter_cache_hits_total", "tuneforge_generation_latency_seconds_count"} <= served
    assert not {"tuneforge_jobs", "tuneforge_queue_depth"} & served


# --- logs -------------------------------------------------------------------------------------------------------
@embedded_only
def test_lines_logged_while_handling_a_request_carry_its_request_id(
    settings: Settings, tenant: Tenant, client: TestClient, json_log: Callable[[], list[dict[str, Any]]]
) -> None:
    file_id = upload(client, tenant, jsonl(chat_lines(8))).json()["id"]
    unreachable = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(unreachable)) as broken:
        r = create_job(broken, tenant, file_id, **{"X-Request-ID": "req-obs-42"})
        assert r.status_code == 503
        assert r.headers["X-Request-ID"] == "req-obs-42"
        unsafe = broken.get("/healthz", headers={"X-Request-ID": 'x" injected=1'})
        assert unsafe.headers["X-Request-ID"] != 'x" injected=1' and len(unsafe.headers["X-Request-ID"]) == 32

    lines = json_log()
    for line in lines:
        assert {"time", "level", "logger", "message"} <= line.keys(), line
    # Inside the route (in a worker thread): the enqueue failure, with its traceback.
    enqueue = [line for line in lines if line["message"].startswith("could not enqueue")]
    assert len(enqueue) == 1 and enqueue[0]["level"] == "ERROR" and "exception" in enqueue[0]
    assert enqueue[0]["request_id"] == "req-obs-42"
    # One access line per request, from the middleware (uvicorn's own is off in `tuneforge api`).
    access = [line for line in lines if line["logger"] == "tuneforge.access" and line.get("request_id") == "req-obs-42"]
    assert len(access) == 1
    assert access[0]["method"] == "POST" and access[0]["path"] == "/jobs" and access[0]["status"] == 503
    assert access[0]["duration_ms"] >= 0 and access[0]["message"].startswith("POST /jobs 503 ")


@embedded_only
def test_an_unexpected_error_answers_500_with_the_request_id_and_logs_it_with_that_id(
    settings: Settings,
    tenant: Tenant,
    monkeypatch: pytest.MonkeyPatch,
    json_log: Callable[[], list[dict[str, Any]]],
) -> None:
    from app.jobs import service

    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("a bug, with /srv/secret/path in its message")

    monkeypatch.setattr(service, "list_jobs", broken)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        r = client.get("/jobs", headers={**tenant.headers, "X-Request-ID": "req-bug-7"})
    assert r.status_code == 500 and r.headers["X-Request-ID"] == "req-bug-7"
    assert r.json()["error"] == {
        "type": "server_error",
        "message": "internal server error",
        "param": None,
        "code": "internal_error",
    }
    logged = [line for line in json_log() if line.get("request_id") == "req-bug-7"]
    [unhandled] = [line for line in logged if line["message"] == "unhandled error"]
    assert unhandled["level"] == "ERROR" and "/srv/secret/path" in unhandled["exception"]  # for the operator only
    assert [line["status"] for line in logged if line["logger"] == "tuneforge.access"] == [500]


@embedded_only
def test_the_worker_logs_a_job_s_start_progress_and_outcome_with_its_id(
    client: TestClient, tenant: Tenant, settings: Settings, json_log: Callable[[], list[dict[str, Any]]]
) -> None:
    job_id = start_job(client, tenant)  # 8 examples, batch 4, 2 epochs: 4 steps
    every_two = settings.model_copy(update={"log_every_steps": 2})
    adapter_id = run_training_job(every_two, job_id)
    assert adapter_id is not None

    mine = [line for line in json_log() if line.get("job_id") == job_id]
    # The worker's start and outcome, the training library's progress between them.
    start, *progress, outcome = [line for line in mine if line["logger"].startswith(("worker.", "app.ml.training."))]
    assert start["message"] == f"job {job_id}: attempt 1 started (lora on tiny-random-llama)"
    assert (start["method"], start["base_model"], start["attempt"]) == ("lora", "tiny-random-llama", 1)
    assert [(p["step"], p["total_steps"]) for p in progress] == [(2, 4), (4, 4)]
    for p in progress:
        assert p["level"] == "INFO" and p["loss"] > 0 and p["tokens_per_second"] > 0
        assert p["message"].startswith(f"job {job_id}: step {p['step']}/4, train loss ")
    assert outcome["level"] == "INFO" and outcome["outcome"] == "succeeded"
    assert outcome["adapter_id"] == adapter_id
    assert outcome["message"] == f"job {job_id} succeeded: adapter {adapter_id} published"


@embedded_only
def test_a_failed_job_is_logged_as_failed_by_the_worker_and_by_celery(
    client: TestClient,
    tenant: Tenant,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    json_log: Callable[[], list[dict[str, Any]]],
) -> None:
    """The Celery task as the worker runs it (Celery's tracer, signals and log lines), in this process."""
    monkeypatch.setenv("TUNEFORGE_DATA_DIR", str(settings.data_dir))  # for worker.celery_app's broker, if imported
    get_settings.cache_clear()
    try:
        from worker import tasks
    finally:
        get_settings.cache_clear()  # nothing after this test sees its settings
    monkeypatch.setattr(tasks, "get_settings", lambda: settings)
    job_id = start_job(client, tenant)
    shutil.rmtree(settings.data_dir / "objects" / "datasets")  # its training data is gone: the job fails

    result = tasks.training_run.apply(kwargs={"job_id": job_id})

    assert result.state == "FAILURE" and isinstance(result.result, tasks.JobFailed)
    job = client.get(f"/jobs/{job_id}", headers=tenant.headers).json()
    assert job["status"] == "failed" and job["error"]["code"] == "file_unavailable"
    mine = [line for line in json_log() if line.get("job_id") == job_id]
    outcome = [line for line in mine if line.get("outcome") == "failed"]
    assert len(outcome) == 1 and outcome[0]["level"] == "ERROR" and outcome[0]["error_code"] == "file_unavailable"
    assert outcome[0]["message"].startswith(f"job {job_id} failed: file_unavailable: ")
    assert "FileNotFoundError" in outcome[0]["exception"]  # the detail, for the operator
    celery = [line for line in mine if line["logger"] == "celery.app.trace"]
    assert len(celery) == 1, mine
    assert "raised expected: JobFailed" in celery[0]["message"] and "file_unavailable" in celery[0]["message"]
    assert not [line for line in mine if "succeeded" in line["message"]]


@embedded_only
def test_a_job_whose_claim_meets_an_unreachable_database_is_retried_not_dropped(
    client: TestClient,
    tenant: Tenant,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    json_log: Callable[[], list[dict[str, Any]]],
) -> None:
    """Before the claim nothing marks the job: a task that ended there would leave it queued for ever."""
    monkeypatch.setenv("TUNEFORGE_DATA_DIR", str(settings.data_dir))
    get_settings.cache_clear()
    try:
        from worker import lifecycle, tasks
    finally:
        get_settings.cache_clear()
    monkeypatch.setattr(tasks, "get_settings", lambda: settings)
    job_id = start_job(client, tenant)
    claim = lifecycle.claim
    calls: list[str] = []

    def claim_once_unreachable(*args: Any, **kwargs: Any) -> Any:
        calls.append(job_id)
        if len(calls) == 1:
            raise OperationalError("SELECT 1", {}, Exception("connection refused"))
        return claim(*args, **kwargs)

    monkeypatch.setattr(lifecycle, "claim", claim_once_unreachable)

    # Celery runs the retry at once here (`apply` is eager); a worker gets it as a new message, in 10 s.
    result = tasks.training_run.apply(kwargs={"job_id": job_id})

    assert result.state == "SUCCESS" and len(calls) == 2
    assert client.get(f"/jobs/{job_id}", headers=tenant.headers).json()["status"] == "succeeded"
    mine = [line for line in json_log() if line.get("job_id") == job_id]
    assert [(o["outcome"], o["level"]) for o in mine if o.get("outcome")] == [
        ("claim_failed", "WARNING"),
        ("succeeded", "INFO"),
    ]
    assert any("Retry in 10s" in line["message"] for line in mine if line["logger"] == "celery.app.trace"), mine


def test_the_text_format_prints_the_same_line_for_a_person() -> None:
    buffer = io.StringIO()
    logger = logging.getLogger("tuneforge.test.text")
    handler = make_handler("text", buffer)
    logger.addHandler(handler)
    logger.propagate = False
    token = request_id_var.set("req-7")
    try:
        with job_logging_context("ftjob-1"):
            logger.warning("step %d of %d", 3, 4)
            try:
                raise ValueError("boom")
            except ValueError:
                logger.exception("it broke")
    finally:
        request_id_var.reset(token)
        logger.removeHandler(handler)
    first, second, *traceback = buffer.getvalue().splitlines()
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00 WARNING tuneforge\.test\.text: step 3 of 4 "
        r"\[request_id=req-7 job_id=ftjob-1\]",
        first,
    ), first
    assert second.endswith("ERROR tuneforge.test.text: it broke [request_id=req-7 job_id=ftjob-1]")
    assert traceback[0] == "Traceback (most recent call last):" and traceback[-1] == "ValueError: boom"


@embedded_only
def test_a_newline_in_a_request_path_cannot_forge_a_text_log_line(settings: Settings, tenant: Tenant) -> None:
    """The server percent-decodes the path before it is logged: `%0A` is a newline, `%1B` a terminal escape. In the
    text format each request is still one line, the characters written as escapes."""
    buffer = io.StringIO()
    handler = make_handler("text", buffer)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    forged = "2026-01-01T00:00:00.000+00:00 INFO tuneforge.access: GET /admin 200 0.1 ms"
    try:
        with TestClient(create_app(settings)) as client:
            for path in (f"/jobs/x%0A{forged}", f"/jobs/x%0D%0A{forged}", f"/jobs/x%E2%80%A8{forged}%1B[2K%00"):
                r = client.get(path, headers={**tenant.headers, "X-Request-ID": "req-forge"})
                assert r.status_code == 404
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    lines = buffer.getvalue().splitlines()
    assert not [line for line in lines if line.startswith(forged[:20])], lines
    access = [line for line in lines if " tuneforge.access: " in line and line.endswith("[request_id=req-forge]")]
    assert len(access) == 3, lines
    assert f"GET /jobs/x\\n{forged} 404 " in access[0]
    assert f"GET /jobs/x\\r\\n{forged} 404 " in access[1]
    assert f"GET /jobs/x\\u2028{forged}\\x1b[2K\\x00 404 " in access[2]


# --- the real processes -----------------------------------------------------------------------------------------
def json_lines(log: Path) -> list[dict[str, Any]]:
    """Every line of a process's log (its stderr), each of which must be one JSON object."""
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"{log.name}: not a JSON line: {line!r}") from None
    return parsed


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_the_api_and_the_worker_log_json_lines_with_ids_and_a_failed_job_says_failed(
    tmp_path: Path, model_cache_dir: Path
) -> None:
    port = free_port()
    settings = embedded_settings(tmp_path / "data", model_cache_dir)
    migrate(settings.db_url)
    from app.auth.service import create_api_key

    with session_scope(settings.db_url) as session:
        key = create_api_key(session, tenant_name="observability")
    env = {
        **os.environ,
        "TUNEFORGE_DATA_DIR": str(settings.data_dir),
        "TUNEFORGE_MODEL_CACHE_DIR": str(model_cache_dir),
        "TUNEFORGE_DEFAULT_BASE_MODEL": "tiny-random-llama",
        "TUNEFORGE_PORT": str(port),
        "TUNEFORGE_REAPER_SECONDS": "0",
        "PYTHONUNBUFFERED": "1",
    }
    url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
    api_log, worker_log, worker_out = tmp_path / "api.log", tmp_path / "worker.log", tmp_path / "worker.out"
    with api_log.open("wb") as err:
        api = subprocess.Popen([*TUNEFORGE, "api"], env=env, stdout=subprocess.DEVNULL, stderr=err)
    worker = None
    try:
        wait_healthy(url, [api])
        with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
            file_id = http.post(
                "/v1/files", files={"file": ("train.jsonl", jsonl(chat_lines(8)))}, data={"purpose": "fine-tune"}
            ).json()["id"]
            created = http.post(
                "/jobs", json={"training_file": file_id}, headers={"X-Request-ID": "e2e-obs-1"}
            ).raise_for_status()
            assert created.headers["X-Request-ID"] == "e2e-obs-1"
            job_id = created.json()["id"]
            waiting = http.get("/metrics").text
            assert f'tuneforge_queue_depth{{queue="{settings.queue_name}"}} 1.0' in waiting
            shutil.rmtree(settings.data_dir / "objects" / "datasets")  # the job will fail: file_unavailable

            with worker_log.open("wb") as err, worker_out.open("wb") as out:
                worker = subprocess.Popen([*TUNEFORGE, "worker"], env=env, stdout=out, stderr=err)
            deadline = time.monotonic() + 120
            while http.get(f"/jobs/{job_id}").json()["status"] != "failed":
                assert time.monotonic() < deadline and worker.poll() is None, worker_log.read_text()[-3000:]
                time.sleep(0.5)
            ended = http.get("/metrics").text
            assert 'tuneforge_jobs{state="failed"} 1.0' in ended
    finally:
        if worker is not None:
            stop(worker)
        stop(api)
    # Acknowledged, not put back: no worker will run the failed job again.
    assert queue_depths(settings)[settings.queue_name] == 0

    api_lines, worker_lines = json_lines(api_log), json_lines(worker_log)
    # On stdout, only what Celery prints itself from its signal handlers (no banner: it is off with JSON logs).
    assert [line for line in worker_out.read_text().splitlines() if line.strip()] == [
        "worker: Warm shutdown (MainProcess)"
    ]
    for line in api_lines + worker_lines:
        assert {"time", "level", "logger", "message"} <= line.keys(), line
    # uvicorn's lines in the same format; its access lines replaced by the app's, which know the request id.
    assert any(line["logger"] == "uvicorn.error" and "Uvicorn running on" in line["message"] for line in api_lines)
    assert not [line for line in api_lines if line["logger"] == "uvicorn.access"]
    (access,) = [line for line in api_lines if line.get("request_id") == "e2e-obs-1"]
    assert (access["logger"], access["method"], access["path"], access["status"]) == (
        "tuneforge.access",
        "POST",
        "/jobs",
        201,
    )
    # Celery's lines and the worker's in the same format; the job's carry its id; the failure is called one.
    assert any(line["logger"] == "celery.apps.worker" and line["message"].endswith(" ready.") for line in worker_lines)
    job_lines = [line for line in worker_lines if line.get("job_id") == job_id]
    assert f"job {job_id}: attempt 1 started (lora on tiny-random-llama)" in [line["message"] for line in job_lines]
    failed = [line for line in job_lines if line.get("outcome") == "failed"]
    assert len(failed) == 1 and failed[0]["level"] == "ERROR" and failed[0]["error_code"] == "file_unavailable"
    celery = [line for line in job_lines if line["logger"] == "celery.app.trace"]
    assert len(celery) == 1 and "raised expected: JobFailed" in celery[0]["message"], job_lines
    assert not [line for line in worker_lines if "succeeded" in line["message"]]
