"""Pausing and resuming a job (`POST /jobs/{id}/pause|resume`, OpenAI's `client.fine_tuning.jobs.pause/resume`): a
running job checkpoints its current step and frees its worker; resumed, it continues from there, nothing trained
twice."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from openai import ConflictError, OpenAI

from app.core.settings import Settings
from app.jobs.reaper import reap_stale_jobs
from tests.conftest import Tenant, chat_lines
from tests.test_fine_tuning_api import openai_client  # noqa: F401  (a fixture)
from tests.test_jobs import queued_messages
from tests.test_lifecycle import adapter_tensors, claim, make_stale
from tests.test_worker import events, start_job
from worker.lifecycle import JobReporter
from worker.runner import run_training_job


def job_of(client: TestClient, tenant: Tenant, job_id: str) -> dict[str, Any]:
    return client.get(f"/jobs/{job_id}", headers=tenant.headers).json()  # type: ignore[no-any-return]


def pause_at(client: TestClient, tenant: Tenant, settings: Settings, job_id: str, step: int) -> dict[str, Any]:
    """Run the job in a thread (as a worker does), ask to pause it once it passed `step`, and wait for the run to
    end; returns what POST /pause answered."""
    result: list[str | None] = []
    thread = threading.Thread(target=lambda: result.append(run_training_job(settings, job_id)))
    thread.start()
    deadline = time.monotonic() + 120
    while job_of(client, tenant, job_id)["progress"]["step"] < step:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.02)
    asked = client.post(f"/jobs/{job_id}/pause", headers=tenant.headers)
    assert asked.status_code == 200, asked.text
    thread.join(timeout=120)
    assert result == [None]  # the run ended without an adapter: it paused
    return asked.json()  # type: ignore[no-any-return]


@pytest.mark.slow  # two training runs; the fast tier pauses queued jobs (test_openai_clients_pause_resume_…)
def test_a_paused_running_job_frees_its_worker_and_resumes_to_the_same_adapter(
    client: TestClient, tenant: Tenant, settings: Settings
) -> None:
    spec = {"n_epochs": 2, "batch_size": 1, "checkpoint_every": 100, "lora_dropout": 0.1}
    reference = start_job(client, tenant, lines=chat_lines(12), **spec)
    job_id = start_job(client, tenant, lines=chat_lines(12), **spec)  # 24 steps, no checkpoint but the pause's
    assert run_training_job(settings, reference) is not None

    asked = pause_at(client, tenant, settings, job_id, 6)
    assert asked["status"] == "running"  # until its worker has checkpointed the step it is on
    job = job_of(client, tenant, job_id)
    assert job["status"] == "paused" and job["error"] is None and job["finished_at"] is None
    paused_at = job["progress"]["step"]
    assert 6 <= paused_at < 24
    log = [e["message"] for e in events(client, tenant, job_id)]
    assert "pause requested: the job pauses once its current step is checkpointed" in log
    assert log[-1] == f"job paused at step {paused_at}; resume it to continue from its latest checkpoint"
    [checkpoint] = client.get(f"/jobs/{job_id}/checkpoints", headers=tenant.headers).json()["data"]
    assert checkpoint["step_number"] == paused_at
    # Nothing waits for a worker: the task was not sent again, and a worker that gets a stale copy does nothing.
    assert sum(job_id in m["kwargsrepr"] for m in queued_messages(settings)) == 1
    assert run_training_job(settings, job_id) is None and job_of(client, tenant, job_id)["status"] == "paused"
    # Pausing again is harmless; resuming a job that is not paused is a conflict.
    assert client.post(f"/jobs/{job_id}/pause", headers=tenant.headers).json()["status"] == "paused"

    resumed = client.post(f"/jobs/{job_id}/resume", headers=tenant.headers)
    assert resumed.status_code == 200 and resumed.json()["status"] == "queued", resumed.text
    assert sum(job_id in m["kwargsrepr"] for m in queued_messages(settings)) == 2
    again = client.post(f"/jobs/{job_id}/resume", headers=tenant.headers)
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_not_paused"

    adapter_id = run_training_job(settings, job_id)
    assert adapter_id is not None
    job = job_of(client, tenant, job_id)
    assert job["status"] == "succeeded" and job["attempt"] == 2
    log = events(client, tenant, job_id)
    assert f"attempt 2: resumed from checkpoint {checkpoint['id']} at step {paused_at}" in [e["message"] for e in log]
    assert [e["data"]["step"] for e in log if e["type"] == "metrics"] == list(range(1, 25))  # each step once
    # The same adapter as the uninterrupted job's (same data, seed and hyperparameters): nothing trained twice.
    expected = adapter_tensors(client, tenant, job_of(client, tenant, reference)["adapter_id"])
    got = adapter_tensors(client, tenant, adapter_id)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)
    # An ended job can be neither paused nor resumed.
    ended = client.post(f"/jobs/{job_id}/pause", headers=tenant.headers)
    assert ended.status_code == 409 and ended.json()["error"]["code"] == "job_not_pausable"
    assert "succeeded" in ended.json()["error"]["message"]


def test_a_job_whose_worker_dies_while_pausing_is_paused_by_the_reaper(
    client: TestClient, tenant: Tenant, settings: Settings
) -> None:
    job_id = start_job(client, tenant)
    first = claim(settings, job_id)
    assert first is not None
    JobReporter(settings.db_url, first).progress(step=1, total_steps=4, epoch=1, metrics={}, message="step 1")
    assert client.post(f"/jobs/{job_id}/pause", headers=tenant.headers).json()["status"] == "running"
    make_stale(settings, job_id)
    assert job_id in reap_stale_jobs(settings)  # (the shared PostgreSQL test database may hold others)
    job = job_of(client, tenant, job_id)
    assert job["status"] == "paused"
    assert "stopped answering while pausing it" in events(client, tenant, job_id)[-1]["message"]
    # Resumed, it trains to the end.
    assert client.post(f"/jobs/{job_id}/resume", headers=tenant.headers).status_code == 200
    assert run_training_job(settings, job_id) is not None
    assert job_of(client, tenant, job_id)["status"] == "succeeded"


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_openai_clients_pause_resume_and_cancel_a_job(openai_client: OpenAI, settings: Settings) -> None:  # noqa: F811
    openai = openai_client
    file_id = openai.files.create(file=("t.jsonl", "\n".join(chat_lines(8)).encode()), purpose="fine-tune").id
    job = openai.fine_tuning.jobs.create(model="tiny-random-llama", training_file=file_id)
    paused = openai.fine_tuning.jobs.pause(job.id)
    assert paused.status == "paused"  # queued: paused at once
    resumed = openai.fine_tuning.jobs.resume(job.id)
    assert resumed.status == "queued"
    assert run_training_job(settings, job.id) is not None
    assert openai.fine_tuning.jobs.retrieve(job.id).status == "succeeded"
    with pytest.raises(ConflictError) as refused:
        openai.fine_tuning.jobs.pause(job.id)
    assert refused.value.code == "job_not_pausable"

    other = openai.fine_tuning.jobs.create(model="tiny-random-llama", training_file=file_id)
    openai.fine_tuning.jobs.pause(other.id)
    cancelled = openai.fine_tuning.jobs.cancel(other.id)  # a paused job can be cancelled
    assert cancelled.status == "cancelled"
    with pytest.raises(ConflictError) as refused:
        openai.fine_tuning.jobs.resume(other.id)
    assert refused.value.code == "job_not_paused"
