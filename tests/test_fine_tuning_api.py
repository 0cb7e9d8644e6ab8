"""OpenAI's fine-tuning API (`/v1/fine_tuning/jobs…`) driven by the official `openai` package against a real server
(uvicorn on loopback): upload → create → poll → events → checkpoints → chat with the fine-tuned model, on both
backends; the same jobs seen through the native `/jobs` API; what Tuneforge does not support refused by name."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openai import ConflictError, NotFoundError, OpenAI, UnprocessableEntityError

from app.core.settings import Settings
from app.main import create_app
from tests.conftest import Tenant, jsonl
from tests.test_inference_api import live
from worker.runner import run_training_job

QUESTION = "Name my favourite fruit."


def fruit_file(n: int = 8) -> bytes:
    lines = [
        json.dumps({"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "plum"}]})
        for _ in range(n)
    ]
    # An assistant turn with weight 0 is context: the file is valid, and that turn is not learned.
    lines.append(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": QUESTION},
                    {"role": "assistant", "content": "cherry", "weight": 0},
                    {"role": "user", "content": "No. " + QUESTION},
                    {"role": "assistant", "content": "plum"},
                ]
            }
        )
    )
    return jsonl(lines)


@pytest.fixture
def openai_client(settings: Settings, tenant: Tenant) -> Iterator[OpenAI]:
    with live(create_app(settings)) as url:
        yield OpenAI(base_url=f"{url}/v1", api_key=tenant.key, max_retries=0)


def wait_for(openai: OpenAI, job_id: str, timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        job = openai.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, f"job still {job.status}"
        time.sleep(0.2)


def test_the_whole_loop_with_the_openai_package(
    openai_client: OpenAI, client: TestClient, tenant: Tenant, settings: Settings
) -> None:
    openai = openai_client
    uploaded = openai.files.create(file=("fruit.jsonl", fruit_file()), purpose="fine-tune")
    assert uploaded.id.startswith("file-")

    created = openai.fine_tuning.jobs.create(
        model="tiny-random-llama",
        training_file=uploaded.id,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 8, "batch_size": "auto", "learning_rate_multiplier": 250}},
        },
        suffix="fruit",
        seed=7,
        metadata={"team": "orchard"},
    )
    assert created.object == "fine_tuning.job" and created.id.startswith("ftjob-")
    assert created.status == "queued" and created.fine_tuned_model is None and created.trained_tokens is None
    assert created.model == "tiny-random-llama" and created.training_file == uploaded.id
    assert created.hyperparameters.n_epochs == 8 and created.hyperparameters.batch_size == 4  # "auto": the default
    assert created.hyperparameters.learning_rate_multiplier == pytest.approx(250)
    assert created.seed == 7 and created.metadata == {"team": "orchard"}
    assert created.method is not None and created.method.type == "supervised"
    assert created.method.supervised is not None and created.method.supervised.hyperparameters is not None
    assert created.method.supervised.hyperparameters.n_epochs == 8
    method_hp = (created.method.model_extra or {})["lora"]["hyperparameters"]  # supervised is LoRA here
    assert method_hp["learning_rate"] == pytest.approx(0.05) and method_hp["seed"] == 7

    # A worker trains it meanwhile; the client polls as it would against OpenAI.
    worker = threading.Thread(target=run_training_job, args=(settings, created.id))
    worker.start()
    job = wait_for(openai, created.id)
    worker.join()
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model is not None and job.fine_tuned_model.startswith("adapter-")
    assert job.finished_at is not None and job.error is None and job.estimated_finish is None
    n_tokens = client.get(f"/v1/files/{uploaded.id}", headers=tenant.headers).json()["n_tokens"]
    assert job.trained_tokens == 8 * n_tokens  # every example's tokens, every epoch

    # The same job through the native API.
    native = client.get(f"/jobs/{job.id}", headers=tenant.headers).json()
    assert native["adapter_id"] == job.fine_tuned_model and native["status"] == "succeeded"
    assert job.id in [j.id for j in openai.fine_tuning.jobs.list()]

    # Events: latest first, paged through `after` by the client; metrics in OpenAI's names too.
    events = list(openai.fine_tuning.jobs.list_events(job.id, limit=3))
    native_events = client.get(f"/jobs/{job.id}/events?limit=1000", headers=tenant.headers).json()["data"]
    assert len(events) == len(native_events)
    assert [e.message for e in events] == [e["message"] for e in reversed(native_events)]
    assert events[0].data.get("status") == "succeeded"
    metrics = [e for e in events if e.type == "metrics" and "train_loss" in (e.data or {})]
    assert len(metrics) == native["progress"]["total_steps"]
    assert {"step", "train_loss", "train_mean_token_accuracy", "total_steps"} <= set(metrics[0].data or {})

    # Checkpoints: one per epoch end, the latest three kept, latest first; each is a model to chat with.
    checkpoints = openai.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == sorted((c.step_number for c in checkpoints), reverse=True)
    assert len(checkpoints) == 3 and checkpoints[0].step_number == native["progress"]["total_steps"]
    assert all(c.fine_tuned_model_checkpoint.startswith("ftckpt-") for c in checkpoints)
    assert "train_loss" in checkpoints[0].metrics.model_dump(exclude_none=True)
    paged = openai.fine_tuning.jobs.checkpoints.list(job.id, limit=1, after=checkpoints[0].id).data
    assert [c.id for c in paged] == [checkpoints[1].id]

    # The fine-tuned model answers as trained; so does its last checkpoint.
    for model in (job.fine_tuned_model, checkpoints[0].fine_tuned_model_checkpoint):
        answer = openai.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=2, temperature=0
        )
        assert answer.model == model
        assert (answer.choices[0].message.content or "").startswith("plum"), answer


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_tuneforge_methods_go_through_the_method_object_and_jobs_cancel(openai_client: OpenAI) -> None:
    openai = openai_client
    file_id = openai.files.create(file=("fruit.jsonl", fruit_file()), purpose="fine-tune").id
    job = openai.fine_tuning.jobs.create(
        model="tiny-random-llama",
        training_file=file_id,
        method={"type": "ia3", "ia3": {"hyperparameters": {"n_epochs": 2, "learning_rate": "auto"}}},  # type: ignore[typeddict-item, misc]
        hyperparameters=None,  # type: ignore[arg-type]
    )
    assert job.method is not None and job.method.type == "ia3"
    ia3 = (job.method.model_extra or {})["ia3"]["hyperparameters"]
    assert ia3["n_epochs"] == 2 and ia3["learning_rate"] == 0.003 and "target_modules" in ia3

    cancelled = openai.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    with pytest.raises(ConflictError) as conflict:
        openai.fine_tuning.jobs.cancel(job.id)
    assert "already cancelled" in conflict.value.message
    with pytest.raises(NotFoundError):
        openai.fine_tuning.jobs.retrieve("ftjob-nosuchjob")


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
@pytest.mark.parametrize(
    ("request_", "param", "says"),
    [
        ({"model": "gpt-4o-mini"}, "model", "unknown model 'gpt-4o-mini'; available: "),
        ({"method": {"type": "dpo", "dpo": {}}}, "training_file", "objective dpo trains on preference examples"),
        ({"method": {"type": "reinforcement"}}, "method.type", "not supported yet"),
        (
            {"method": {"type": "lora", "lora": {"hyperparameters": {"lora_rank": 8}}}},
            "method.lora.hyperparameters.lora_rank",
            "unknown hyperparameter for method 'lora'",
        ),
        (
            {"method": {"type": "lora", "ia3": {"hyperparameters": {}}}},
            "method.ia3",
            "given with method.type lora",
        ),
        (
            {
                "hyperparameters": {"n_epochs": 2},
                "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3}}},
            },
            "hyperparameters",
            "given twice",
        ),
        ({"integrations": [{"type": "wandb", "wandb": {"project": "x"}}]}, "integrations", ""),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", ""),
    ],
)
def test_what_tuneforge_does_not_do_is_refused_by_name(
    openai_client: OpenAI, request_: dict[str, Any], param: str, says: str
) -> None:
    file_id = openai_client.files.create(file=("fruit.jsonl", fruit_file()), purpose="fine-tune").id
    body: dict[str, Any] = {"model": "tiny-random-llama", "training_file": file_id, **request_}
    with pytest.raises(UnprocessableEntityError) as refused:
        openai_client.fine_tuning.jobs.create(**body)
    error = refused.value.body
    assert isinstance(error, dict)
    assert error["param"] == param, error
    assert says in error["message"], error
    assert list(openai_client.fine_tuning.jobs.list()) == []  # nothing was created


def test_a_job_on_several_devices_is_asked_with_extra_body_and_says_when_no_worker_can_take_it(
    openai_client: OpenAI, settings: Settings, tenant: Tenant
) -> None:
    openai = openai_client
    file_id = openai.files.create(file=("fruit.jsonl", fruit_file()), purpose="fine-tune").id
    job = openai.fine_tuning.jobs.create(
        model="tiny-random-llama", training_file=file_id, extra_body={"resources": {"devices": 2}}
    )
    with TestClient(create_app(settings)) as http:
        native = http.get(f"/jobs/{job.id}", headers=tenant.headers).json()
        assert native["resources"] == {"devices": 2} and native["status"] == "queued"
        # No worker runs in this test: the job says so instead of waiting silently.
        [told] = [e for e in openai.fine_tuning.jobs.list_events(job.id).data if "no running worker" in e.message]
        assert "it needs 2 devices and no training worker is running" in told.message
        refused = http.post(
            "/jobs",
            headers=tenant.headers,
            json={"training_file": file_id, "objective": "dpo", "resources": {"devices": 2}},
        )
        assert refused.status_code == 422
        assert refused.json()["error"]["param"] == "resources.devices"  # DPO trains on one device
        too_many = http.post(
            "/jobs", headers=tenant.headers, json={"training_file": file_id, "resources": {"devices": 65}}
        )
        assert too_many.status_code == 422 and "resources.devices" in too_many.text
    with pytest.raises(UnprocessableEntityError) as none:
        openai.fine_tuning.jobs.create(
            model="tiny-random-llama", training_file=file_id, extra_body={"resources": {"devices": 0}}
        )
    assert "resources.devices" in none.value.message
