"""The training runner (what the Celery task calls), run in-process on both backends."""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.core.settings import Settings
from app.core.storage import ObjectStorage
from tests.conftest import Tenant, chat_lines, jsonl, upload
from worker.runner import run_training_job


def start_job(client: TestClient, tenant: Tenant, lines: list[str] | None = None, **hyperparameters: Any) -> str:
    file_id = upload(client, tenant, jsonl(lines or chat_lines(8))).json()["id"]
    r = client.post(
        "/jobs",
        headers=tenant.headers,
        json={
            "base_model": "tiny-random-llama",
            "training_file": file_id,
            "validation_file": file_id,
            "hyperparameters": {"n_epochs": 2, **hyperparameters},
        },
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def events(client: TestClient, tenant: Tenant, job_id: str) -> list[dict[str, Any]]:
    return client.get(f"/jobs/{job_id}/events?limit=1000", headers=tenant.headers).json()["data"]  # type: ignore[no-any-return]


def test_job_trains_publishes_and_succeeds(client: TestClient, tenant: Tenant, settings: Settings) -> None:
    job_id = start_job(client, tenant)
    adapter_id = run_training_job(settings, job_id)
    assert adapter_id is not None and adapter_id.startswith("adapter-")

    job = client.get(f"/jobs/{job_id}", headers=tenant.headers).json()
    assert job["status"] == "succeeded"
    assert job["adapter_id"] == adapter_id
    assert job["progress"] == {"step": 4, "total_steps": 4, "epoch": 2}  # 8 examples / batch 4 * 2 epochs
    assert job["attempt"] == 1
    # LoRA r=8 on q_proj (64 -> 64) and v_proj (64 -> 32) of 2 layers: 2 x (8 x (64 + 64) + 8 x (64 + 32)).
    assert job["metrics"]["trainable_parameters"] == 3584
    assert job["metrics"]["total_parameters"] == 3_219_776 + 3584
    assert job["metrics"]["trainable_share"] == round(3584 / (3_219_776 + 3584), 6)
    assert job["started_at"] is not None and job["finished_at"] >= job["started_at"]
    for name in (
        "train_loss",
        "train_token_accuracy",
        "valid_loss",
        "valid_perplexity",
        "valid_token_accuracy",
        "tokens_per_second",
        "learning_rate",
    ):
        assert isinstance(job["metrics"][name], float | int), name

    log = events(client, tenant, job_id)
    assert [e["seq"] for e in log] == list(range(1, len(log) + 1))
    statuses = [e["data"]["status"] for e in log if e["type"] == "status"]
    assert statuses == ["validating_files", "queued", "running", "succeeded"]
    assert [e["data"]["step"] for e in log if e["type"] == "metrics"] == [1, 2, 3, 4]
    assert [e["data"]["epoch"] for e in log if e["type"] == "eval"] == [1, 2]

    adapter = client.get(f"/adapters/{adapter_id}", headers=tenant.headers).json()
    assert adapter["base_model"] == "tiny-random-llama"
    assert adapter["method"] == "lora" and adapter["format"] == "peft" and adapter["job_id"] == job_id
    assert [a["id"] for a in client.get("/adapters", headers=tenant.headers).json()["data"]] == [adapter_id]

    download = client.get(f"/adapters/{adapter_id}/download", headers=tenant.headers)
    assert download.status_code == 200
    assert len(download.content) == adapter["size_bytes"]
    import hashlib

    assert hashlib.sha256(download.content).hexdigest() == adapter["sha256"]
    with tarfile.open(fileobj=io.BytesIO(download.content), mode="r:gz") as tar:
        names = sorted(tar.getnames())
        config = json.load(tar.extractfile("adapter_config.json"))  # type: ignore[arg-type]
        manifest = json.load(tar.extractfile("tuneforge.json"))  # type: ignore[arg-type]
    assert names == ["README.md", "adapter_config.json", "adapter_model.safetensors", "tuneforge.json"]
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert config["base_model_name_or_path"] == "tiny-random-llama"
    assert manifest["job_id"] == job_id and manifest["adapter_id"] == adapter_id


def test_loss_goes_down_on_learnable_data(client: TestClient, tenant: Tenant, settings: Settings) -> None:
    lines = [json.dumps({"prompt": "Colour of the sky:", "completion": " blue"})] * 8
    job_id = start_job(client, tenant, lines, n_epochs=6, learning_rate=0.05, target_modules="all-linear")
    assert run_training_job(settings, job_id) is not None
    losses = [e["data"]["train_loss"] for e in events(client, tenant, job_id) if e["type"] == "metrics"]
    assert len(losses) == 12
    assert losses[-1] < losses[0] * 0.7, losses


@pytest.mark.slow  # two training runs; idempotent claims are checked at the task level too
def test_running_a_task_twice_is_harmless(client: TestClient, tenant: Tenant, settings: Settings) -> None:
    job_id = start_job(client, tenant)
    first = run_training_job(settings, job_id)
    n_events = len(events(client, tenant, job_id))
    assert run_training_job(settings, job_id) is None  # redelivered message: the job is not queued any more
    assert len(events(client, tenant, job_id)) == n_events
    assert client.get(f"/jobs/{job_id}", headers=tenant.headers).json()["adapter_id"] == first


def test_a_crash_inside_training_fails_the_job_readably(client: TestClient, tenant: Tenant, settings: Settings) -> None:
    job_id = start_job(client, tenant)
    storage = ObjectStorage.from_settings(settings)
    for key in storage.list_keys("datasets"):
        storage.delete(key)  # the training data vanished from the object store behind our back
    assert run_training_job(settings, job_id) is None
    job = client.get(f"/jobs/{job_id}", headers=tenant.headers).json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "file_unavailable"
    assert job["error"]["message"].startswith("a file of this job could not be read from storage")
    assert job["finished_at"] is not None and job["adapter_id"] is None
    last = events(client, tenant, job_id)[-1]
    assert last["level"] == "error" and last["data"] == {"status": "failed", "code": "file_unavailable"}
    assert storage.list_keys("adapters") == []


def test_examples_longer_than_max_seq_length_without_completion_fail_clearly(
    client: TestClient, tenant: Tenant, settings: Settings
) -> None:
    lines = [json.dumps({"prompt": "word " * 40, "completion": " end"})] * 2
    job_id = start_job(client, tenant, lines, max_seq_length=16)
    assert run_training_job(settings, job_id) is None
    job = client.get(f"/jobs/{job_id}", headers=tenant.headers).json()
    assert job["status"] == "failed"
    assert job["error"]["message"] == ("the training file has no example with a completion inside max_seq_length=16")


def test_cancel_while_running_stops_without_publishing(client: TestClient, tenant: Tenant, settings: Settings) -> None:
    job_id = start_job(client, tenant, n_epochs=100)
    result: list[str | None] = []
    thread = threading.Thread(target=lambda: result.append(run_training_job(settings, job_id)))
    thread.start()
    deadline = time.monotonic() + 120
    while client.get(f"/jobs/{job_id}", headers=tenant.headers).json()["progress"]["step"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = client.post(f"/jobs/{job_id}/cancel", headers=tenant.headers)
    assert r.status_code == 200
    thread.join(timeout=120)
    assert result == [None]
    job = client.get(f"/jobs/{job_id}", headers=tenant.headers).json()
    assert job["status"] == "cancelled"
    assert job["adapter_id"] is None
    assert job["progress"]["step"] < job["progress"]["total_steps"]
    assert events(client, tenant, job_id)[-1]["message"] == "training stopped: the job was cancelled"
    assert ObjectStorage.from_settings(settings).list_keys("adapters") == []


def test_a_job_cancelled_before_it_starts_is_not_run(client: TestClient, tenant: Tenant, settings: Settings) -> None:
    job_id = start_job(client, tenant)
    client.post(f"/jobs/{job_id}/cancel", headers=tenant.headers)
    assert run_training_job(settings, job_id) is None
    job = client.get(f"/jobs/{job_id}", headers=tenant.headers).json()
    assert job["status"] == "cancelled" and job["attempt"] == 0


def test_early_stopping_through_the_service_reports_the_published_step(
    client: TestClient, tenant: Tenant, settings: Settings
) -> None:
    job_id = start_job(client, tenant, n_epochs=3, early_stopping_patience=5, eval_every=1)
    assert run_training_job(settings, job_id) is not None
    job = client.get(f"/jobs/{job_id}", headers=tenant.headers).json()
    evaluations = {
        e["data"]["step"]: e["data"]["valid_loss"] for e in events(client, tenant, job_id) if e["type"] == "eval"
    }
    assert sorted(evaluations) == [1, 2, 3, 4, 5, 6]  # every step, not twice at an epoch's end
    assert job["metrics"]["best_valid_loss"] == min(evaluations.values())
    assert evaluations[job["metrics"]["best_step"]] == job["metrics"]["best_valid_loss"]
    [summary] = [e for e in events(client, tenant, job_id) if e["type"] == "early_stopping"]
    assert summary["message"].startswith("trained all 6 steps; publishing the weights of step ")
