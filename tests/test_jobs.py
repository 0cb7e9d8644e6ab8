"""POST/GET /jobs, cancellation and the event log, on both backends."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import inspect, text

from app.core.db import get_engine
from app.core.settings import Settings
from app.main import create_app
from tests.conftest import Tenant, chat_lines, jsonl, upload
from worker.runner import run_training_job


@pytest.fixture
def training_file(client: TestClient, tenant: Tenant) -> str:
    return str(upload(client, tenant, jsonl(chat_lines(8))).json()["id"])


def create(client: TestClient, tenant: Tenant, **body: Any) -> Any:
    return client.post("/jobs", headers=tenant.headers, json=body)


def queued_messages(settings: Settings, queue: str | None = None) -> list[dict[str, Any]]:
    """Training tasks waiting on the broker (on `queue`, by default the settings' queue), read straight from it."""
    queue = queue or settings.queue_name
    if settings.broker.startswith("redis"):
        raw = redis.Redis.from_url(settings.broker).lrange(queue, 0, -1)
        return [json.loads(m)["headers"] for m in raw]
    broker_db = settings.broker.removeprefix("sqla+")
    if not inspect(get_engine(broker_db)).has_table("kombu_message"):
        return []  # created on the first send
    with get_engine(broker_db).connect() as conn:
        rows = conn.execute(
            text("SELECT m.payload FROM kombu_message m JOIN kombu_queue q ON m.queue_id = q.id WHERE q.name = :q"),
            {"q": queue},
        ).all()
    return [json.loads(r[0])["headers"] for r in rows]


def test_create_job_fills_defaults_and_enqueues(
    client: TestClient, tenant: Tenant, training_file: str, settings: Settings
) -> None:
    r = create(
        client,
        tenant,
        base_model="tiny-random-llama",
        method="lora",
        training_file=training_file,
        suffix="fruit",
        hyperparameters={"n_epochs": 2, "lora_r": 4},
    )
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["id"].startswith("ftjob-")
    assert job["status"] == "queued"
    assert job["hyperparameters"] == {
        "n_epochs": 2,
        "batch_size": 4,
        "learning_rate": 0.0002,
        "max_seq_length": 512,
        "seed": 42,
        "lr_scheduler": "linear",
        "warmup_ratio": 0.03,
        "gradient_accumulation_steps": 1,
        "eval_every": None,
        "validation_split": 0.0,
        "early_stopping_patience": None,
        "checkpoint_every": None,
        "keep_checkpoints": 3,
        "lora_r": 4,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "target_modules": ["q_proj", "v_proj"],  # PEFT's default for LLaMA
        "use_dora": False,
        "use_rslora": False,
    }
    assert job["progress"] == {"step": 0, "total_steps": None, "epoch": 0}
    assert job["adapter_id"] is None and job["error"] is None
    messages = queued_messages(settings)
    assert [(m["task"], m["argsrepr"], m["kwargsrepr"]) for m in messages] == [
        ("training.run", "()", repr({"job_id": job["id"]}))
    ]
    events = client.get(f"/jobs/{job['id']}/events", headers=tenant.headers).json()["data"]
    assert [(e["seq"], e["data"]["status"]) for e in events] == [(1, "validating_files"), (2, "queued")]
    assert client.get(f"/jobs/{job['id']}", headers=tenant.headers).json() == job


def test_base_model_defaults_from_settings(client: TestClient, tenant: Tenant, training_file: str) -> None:
    r = create(client, tenant, training_file=training_file)
    assert r.status_code == 201
    assert r.json()["base_model"] == "tiny-random-llama"
    assert r.json()["method"] == "lora"


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        (
            {"base_model": "gpt-17"},
            "base_model",
            "unknown base_model 'gpt-17'; available: smollm2-135m-instruct, tiny-random-llama",
        ),
        ({"method": "magic"}, "method", "unknown method 'magic'"),
        ({"hyperparameters": {"lora_r": 0}}, "hyperparameters.lora_r", "greater than or equal to 1"),
        ({"hyperparameters": {"learning_rate": -1}}, "hyperparameters.learning_rate", "greater than 0"),
        ({"hyperparameters": {"n_epochs": "many"}}, "hyperparameters.n_epochs", "valid integer"),
        ({"hyperparameters": {"lora_dropout": 1.5}}, "hyperparameters.lora_dropout", "less than 1"),
        (
            {"hyperparameters": {"target_modules": ["q_proj", "attn"]}},
            "hyperparameters.target_modules",
            "attn is not a linear layer of tiny-random-llama (llama); its linear layers: q_proj, k_proj",
        ),
        ({"hyperparameters": {"max_seq_length": 4096}}, "hyperparameters.max_seq_length", "at most 2048"),
        ({"hyperparameters": {"epochs": 3}}, "hyperparameters.epochs", "unknown hyperparameter"),
        (
            {"hyperparameters": {"early_stopping_patience": 2}},
            "hyperparameters.early_stopping_patience",
            "early stopping needs a validation_file or a validation_split",
        ),
        ({"hyperparameters": {"lr_scheduler": "step"}}, "hyperparameters.lr_scheduler", "'linear' or 'cosine'"),
        (
            {"hyperparameters": {"validation_split": 0.9}},
            "hyperparameters.validation_split",
            "less than or equal to 0.5",
        ),
        ({"training_file": "file-doesnotexist"}, "training_file", "no file with id 'file-doesnotexist'"),
        ({"validation_file": "file-doesnotexist"}, "validation_file", "no file with id"),
        ({"suffix": "has spaces"}, "suffix", "pattern"),
        ({"training_file": None}, "training_file", "string"),
    ],
)
def test_invalid_job_requests_are_422_naming_the_field(
    client: TestClient,
    tenant: Tenant,
    training_file: str,
    settings: Settings,
    body: dict[str, Any],
    param: str,
    fragment: str,
) -> None:
    request = {"base_model": "tiny-random-llama", "training_file": training_file, **body}
    r = create(client, tenant, **request)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert fragment in error["message"]
    assert client.get("/jobs", headers=tenant.headers).json()["data"] == []
    assert queued_messages(settings) == []


def test_missing_training_file_field(client: TestClient, tenant: Tenant) -> None:
    r = create(client, tenant, base_model="tiny-random-llama")
    assert r.status_code == 422
    assert r.json()["error"] == {
        "type": "invalid_request_error",
        "message": "training_file: Field required",
        "param": "training_file",
        "code": "missing_field",
    }


def test_another_tenants_file_cannot_be_used(client: TestClient, make_tenant, training_file: str, tenant) -> None:  # type: ignore[no-untyped-def]
    other = make_tenant()
    r = create(client, other, training_file=training_file)
    assert r.status_code == 422
    assert r.json()["error"]["param"] == "training_file"


def test_list_is_newest_first_with_cursor(client: TestClient, tenant: Tenant, training_file: str) -> None:
    ids = [create(client, tenant, training_file=training_file).json()["id"] for _ in range(5)]
    page = client.get("/jobs?limit=2", headers=tenant.headers).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2]
    assert page["has_more"] is True
    page2 = client.get(f"/jobs?limit=2&after={page['data'][-1]['id']}", headers=tenant.headers).json()
    page3 = client.get(f"/jobs?limit=2&after={page2['data'][-1]['id']}", headers=tenant.headers).json()
    assert [j["id"] for j in page2["data"] + page3["data"]] == ids[::-1][2:]
    assert page3["has_more"] is False
    r = client.get("/jobs?limit=0", headers=tenant.headers)
    assert r.status_code == 422 and r.json()["error"]["param"] == "limit"
    r = client.get("/jobs?after=ftjob-nope", headers=tenant.headers)
    assert r.status_code == 422 and r.json()["error"]["param"] == "after"


def test_cancel_a_queued_job(client: TestClient, tenant: Tenant, training_file: str) -> None:
    job_id = create(client, tenant, training_file=training_file).json()["id"]
    r = client.post(f"/jobs/{job_id}/cancel", headers=tenant.headers)
    assert r.status_code == 200
    assert r.json()["status"] == "cancelled"
    assert r.json()["finished_at"] is not None
    r = client.post(f"/jobs/{job_id}/cancel", headers=tenant.headers)
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "job_not_cancellable"
    assert "already cancelled" in r.json()["error"]["message"]
    events = client.get(f"/jobs/{job_id}/events", headers=tenant.headers).json()["data"]
    assert [e["seq"] for e in events] == [1, 2, 3]
    assert events[-1]["data"] == {"status": "cancelled"}


def test_events_paginate_by_sequence(client: TestClient, tenant: Tenant, training_file: str) -> None:
    job_id = create(client, tenant, training_file=training_file).json()["id"]
    client.post(f"/jobs/{job_id}/cancel", headers=tenant.headers)
    first = client.get(f"/jobs/{job_id}/events?limit=2", headers=tenant.headers).json()
    assert [e["seq"] for e in first["data"]] == [1, 2] and first["has_more"] is True
    rest = client.get(f"/jobs/{job_id}/events?after=2", headers=tenant.headers).json()
    assert [e["seq"] for e in rest["data"]] == [3] and rest["has_more"] is False


def test_jobs_are_invisible_to_other_tenants(client: TestClient, make_tenant, training_file: str, tenant) -> None:  # type: ignore[no-untyped-def]
    job_id = create(client, tenant, training_file=training_file).json()["id"]
    other = make_tenant()
    for method, path in [
        ("get", f"/jobs/{job_id}"),
        ("post", f"/jobs/{job_id}/cancel"),
        ("get", f"/jobs/{job_id}/events"),
    ]:
        r = getattr(client, method)(path, headers=other.headers)
        assert r.status_code == 404, path
        assert r.json()["error"]["code"] == "not_found"
    assert client.get("/jobs", headers=other.headers).json()["data"] == []
    assert client.get(f"/jobs/{job_id}", headers=tenant.headers).json()["status"] == "queued"


def test_unreachable_broker_fails_the_job_visibly(
    settings: Settings, tenant: Tenant, training_file: str, client: TestClient
) -> None:
    from app.main import create_app

    broken = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(broken)) as c:
        r = create(c, tenant, training_file=training_file)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "queue_unavailable"
    jobs = client.get("/jobs", headers=tenant.headers).json()["data"]
    assert [j["status"] for j in jobs] == ["failed"]
    error = jobs[0]["error"]
    assert error["code"] == "queue_unavailable"
    assert "job queue was unreachable" in error["message"]
    assert "127.0.0.1" not in error["message"] and "redis" not in error["message"]


def test_a_tenant_past_its_active_job_limit_gets_429_with_retry_after(
    settings: Settings, tenant: Tenant, make_tenant: Any, training_file: str
) -> None:
    with TestClient(create_app(settings.model_copy(update={"max_active_jobs_per_tenant": 2}))) as client:
        body = {"base_model": "tiny-random-llama", "training_file": training_file}
        first, second = (create(client, tenant, **body).json()["id"] for _ in range(2))
        r = create(client, tenant, **body)
        assert r.status_code == 429 and r.headers["Retry-After"] == "30"
        error = r.json()["error"]
        assert error["code"] == "too_many_jobs" and "2 jobs queued or running" in error["message"]
        # Another tenant is not held back, and an ended job frees its place.
        other = make_tenant()
        other_file = upload(client, other, jsonl(chat_lines(8))).json()["id"]
        assert create(client, other, base_model="tiny-random-llama", training_file=other_file).status_code == 201
        client.post(f"/jobs/{first}/cancel", headers=tenant.headers)
        assert create(client, tenant, **body).status_code == 201
        assert client.get(f"/jobs/{second}", headers=tenant.headers).json()["status"] == "queued"


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)  # a fresh database: no finished job yet
def test_a_dry_run_checks_everything_and_creates_nothing(
    client: TestClient, tenant: Tenant, training_file: str, settings: Settings
) -> None:
    body = {
        "base_model": "tiny-random-llama",
        "training_file": training_file,
        "hyperparameters": {"n_epochs": 2, "batch_size": 3, "validation_split": 0.25},
        "dry_run": True,
    }
    r = create(client, tenant, **body)
    assert r.status_code == 200, r.text
    plan = r.json()
    assert plan["object"] == "fine_tuning.job.dry_run" and plan["hyperparameters"]["target_modules"]
    # 8 examples, 2 held out; 6 in steps of 3, twice.
    assert (plan["train_examples"], plan["held_out_examples"], plan["steps_per_epoch"], plan["total_steps"]) == (
        6,
        2,
        2,
        4,
    )
    file = client.get(f"/v1/files/{training_file}", headers=tenant.headers).json()
    assert 0 < plan["train_tokens_per_epoch"] <= file["n_tokens"]
    assert plan["estimated_duration_seconds"] is None and plan["estimate_basis"].startswith("none yet")
    assert client.get("/jobs", headers=tenant.headers).json()["data"] == [] and queued_messages(settings) == []
    # The same checks as a real request: a bad value is the same 422.
    bad = create(client, tenant, **{**body, "hyperparameters": {"lora_r": 0}})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "hyperparameters.lora_r"

    # Once a job of the method has finished here, its pace estimates the duration.
    job_id = create(client, tenant, **{**body, "dry_run": False}).json()["id"]
    assert run_training_job(settings, job_id) is not None
    plan = create(client, tenant, **body).json()
    pace = client.get(f"/jobs/{job_id}", headers=tenant.headers).json()["metrics"]["tokens_per_second"]
    assert plan["estimated_tokens_per_second"] == round(pace, 1)
    assert plan["estimated_duration_seconds"] == round(2 * plan["train_tokens_per_epoch"] / pace)
    assert plan["estimate_basis"].startswith("the median pace of your last 1 finished lora job(s)")


def test_a_dry_run_estimates_only_from_the_tenants_own_jobs(
    client: TestClient, tenant: Tenant, make_tenant: Any, training_file: str, settings: Settings
) -> None:
    """Another tenant's finished jobs neither change my estimate nor tell me they exist (on PostgreSQL the database
    also holds every other test's jobs: none of them counts either)."""
    body = {"base_model": "tiny-random-llama", "hyperparameters": {"n_epochs": 1}, "dry_run": True}
    other = make_tenant()
    other_file = upload(client, other, jsonl(chat_lines(8))).json()["id"]
    other_job = create(client, other, **{**body, "dry_run": False}, training_file=other_file).json()["id"]
    assert run_training_job(settings, other_job) is not None
    assert create(client, other, **body, training_file=other_file).json()["estimated_duration_seconds"] is not None

    plan = create(client, tenant, **body, training_file=training_file).json()
    assert plan["estimated_tokens_per_second"] is None and plan["estimated_duration_seconds"] is None
    assert plan["estimate_basis"] == "none yet: none of your lora jobs on tiny-random-llama has finished"
