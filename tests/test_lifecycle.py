"""A job's lifecycle in-process: checkpoints (listed, served, downloaded), resuming from one to the same result,
handing a job back when the worker stops, heartbeats, the reaper, the claim, and per-tenant storage limits.
The same behaviours against real processes (kill -9, SIGTERM, a lost database) are in test_faults.py."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import obstore.exceptions
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load as load_safetensors
from sqlalchemy import select, update

from app.core import models
from app.core.db import session_scope
from app.core.errors import ErrorCode
from app.core.ids import new_id
from app.core.models import Checkpoint, Job, utcnow
from app.core.settings import Settings
from app.core.storage import ObjectStorage
from app.core.usage import stored_bytes
from app.jobs import state
from app.jobs.reaper import Reaper, reap_stale_jobs, resend_queued_jobs
from app.jobs.state import ClaimedJob, JobLost
from app.main import create_app
from app.ml.training import TrainingRecipe
from tests.conftest import Tenant, chat_lines, jsonl, upload
from tests.test_jobs import queued_messages
from tests.test_recipe import MemoryReporter, recipe_for
from tests.test_worker import events, start_job
from worker import lifecycle
from worker.checkpoints import JobCheckpoints
from worker.lifecycle import Heartbeat, JobAttempt, JobReporter
from worker.runner import CHECKPOINT_UNREADABLE_MESSAGE, run_job, run_training_job, set_aside_message


# --- the recipe's state ---------------------------------------------------------------------------
class Interrupted(Exception):
    """Stands for the process dying right after a checkpoint was saved."""


class MemoryCheckpoints:
    """Keeps each checkpoint's state as the worker stores it (torch.save, loaded back with weights_only)."""

    def __init__(self, interrupt_after: int | None = None) -> None:
        self.saved: list[tuple[int, dict[str, Any]]] = []
        self.interrupt_after = interrupt_after

    def save(self, recipe: TrainingRecipe) -> None:
        with tempfile.TemporaryDirectory() as tmp:  # as the worker does: the artifact too, mid-training
            recipe.export(Path(tmp))
        buffer = io.BytesIO()
        torch.save(recipe.state_dict(), buffer)
        buffer.seek(0)
        self.saved.append((recipe.position.step, torch.load(buffer, weights_only=True)))
        if self.interrupt_after is not None and len(self.saved) >= self.interrupt_after:
            raise Interrupted()


CASES = {
    # LoRA with dropout (the RNG), over epochs (the data order and position).
    "lora": ("lora", "plum", {"lora_dropout": 0.1}),
    # Gradual unfreezing: which blocks train, and the optimizer state of those unfrozen since.
    "layerwise": ("layerwise", "plum", {"unfreeze_every": 3, "learning_rate": 1e-3}),
    # Early stopping: the best evaluation so far and the evaluations without improvement.
    "early_stopping": (
        "lora",
        "kiwi",
        {"early_stopping_patience": 2, "n_epochs": 20, "learning_rate": 0.05, "target_modules": "all-linear"},
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_a_run_resumed_from_a_checkpoint_ends_where_an_uninterrupted_run_does(case: str, model_cache_dir: Path) -> None:
    method, validation, extra = CASES[case]
    hp = {"n_epochs": 3, "batch_size": 2, "checkpoint_every": 3, **extra}  # 4 steps an epoch

    def recipe(reporter: MemoryReporter, checkpoints: MemoryCheckpoints) -> TrainingRecipe:
        return recipe_for(
            model_cache_dir, reporter, validation=validation, method=method, checkpointer=checkpoints, **hp
        )

    whole_reporter, whole_checkpoints = MemoryReporter(), MemoryCheckpoints()
    whole = recipe(whole_reporter, whole_checkpoints)
    whole.setup()
    whole.train()

    # The first run dies after its third checkpoint (step 6, in the middle of the second epoch)...
    first = recipe(MemoryReporter(), MemoryCheckpoints(interrupt_after=3))
    first.setup()
    with pytest.raises(Interrupted):
        first.train()
    saved_step, state = first.checkpoints.saved[-1]  # type: ignore[union-attr]
    assert saved_step == [s for s, _ in whole_checkpoints.saved][2]
    # ... and a new one, in a new recipe, continues from that checkpoint.
    resumed_reporter = MemoryReporter()
    resumed = recipe(resumed_reporter, MemoryCheckpoints())
    resumed.setup(resume=state)
    resumed.train()

    steps = [d["step"] for d in resumed_reporter.of_type("metrics")]
    assert steps == list(range(saved_step + 1, whole.position.step + 1))  # no step trained twice, none skipped
    expected = {d["step"]: d["train_loss"] for d in whole_reporter.of_type("metrics")}
    assert [d["train_loss"] for d in resumed_reporter.of_type("metrics")] == pytest.approx(
        [expected[s] for s in steps], abs=1e-5
    )
    assert resumed.position.step == whole.position.step
    final, reference = resumed.trainable_state(), whole.trainable_state()
    assert final.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(final[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
    if case == "early_stopping":
        [summary] = resumed_reporter.of_type("early_stopping")
        assert summary == whole_reporter.of_type("early_stopping")[0]


# --- checkpoints through the service --------------------------------------------------------------
def test_checkpoints_are_listed_served_and_downloaded(
    client: TestClient, tenant: Tenant, make_tenant: Any, settings: Settings
) -> None:
    job_id = start_job(client, tenant, n_epochs=2, batch_size=4, checkpoint_every=1, keep_checkpoints=2)
    assert run_training_job(settings, job_id) is not None
    listed = client.get(f"/jobs/{job_id}/checkpoints", headers=tenant.headers)
    assert listed.status_code == 200, listed.text
    checkpoints = listed.json()["data"]
    # 8 examples, 4 a step: 4 steps, a checkpoint each; the latest 2 are kept, latest first.
    assert [c["step_number"] for c in checkpoints] == [4, 3]
    assert [c["epoch"] for c in checkpoints] == [2, 2]
    latest = checkpoints[0]
    assert latest["object"] == "fine_tuning.job.checkpoint" and latest["fine_tuning_job_id"] == job_id
    assert latest["fine_tuned_model_checkpoint"] == latest["id"] and latest["id"].startswith("ftckpt-")
    assert {"train_loss", "valid_loss"} <= set(latest["metrics"])
    # The pruned checkpoints' objects are gone, and so, the job having ended, are the kept ones' training
    # states: what is left is each kept checkpoint's artifact.
    storage = ObjectStorage.from_settings(settings)
    keys = storage.list_keys(f"checkpoints/{tenant_id_of(settings, job_id)}/{job_id}")
    assert sorted(k.rsplit("/", 2)[-2:][0] for k in keys) == sorted(c["id"] for c in checkpoints)
    assert all(k.endswith("/artifact.tar.gz") for k in keys)
    # Downloaded like an adapter: the artifact at that step, which PEFT loads.
    download = client.get(latest["download_url"], headers=tenant.headers)
    assert download.status_code == 200
    assert download.headers["x-content-sha256"] == latest["sha256"]
    with tarfile.open(fileobj=io.BytesIO(download.content), mode="r:gz") as tar:
        names = set(tar.getnames())
        manifest = json.loads(tar.extractfile("tuneforge.json").read())  # type: ignore[union-attr]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    assert manifest["checkpoint_id"] == latest["id"] and manifest["step"] == 4
    # Served like an adapter; the last checkpoint is the published adapter's weights.
    prompt = {"prompt": "Name fruit number 1.", "max_tokens": 6, "temperature": 0}
    job = client.get(f"/jobs/{job_id}", headers=tenant.headers).json()
    at_checkpoint = client.post("/generate", headers=tenant.headers, json={**prompt, "adapter_id": latest["id"]})
    published = client.post("/generate", headers=tenant.headers, json={**prompt, "adapter_id": job["adapter_id"]})
    assert at_checkpoint.status_code == 200, at_checkpoint.text
    assert at_checkpoint.json()["text"] == published.json()["text"]
    # Another tenant sees none of it.
    other = make_tenant()
    assert client.get(f"/jobs/{job_id}/checkpoints", headers=other.headers).status_code == 404
    assert client.get(latest["download_url"], headers=other.headers).status_code == 404
    r = client.post("/generate", headers=other.headers, json={**prompt, "adapter_id": latest["id"]})
    assert r.status_code == 404 and r.json()["error"]["param"] == "adapter_id"


def tenant_id_of(settings: Settings, job_id: str) -> str:
    with session_scope(settings.db_url) as session:
        return str(session.scalars(select(Job.tenant_id).where(Job.id == job_id)).one())


def adapter_tensors(client: TestClient, tenant: Tenant, adapter_id: str) -> dict[str, torch.Tensor]:
    archive = client.get(f"/adapters/{adapter_id}/download", headers=tenant.headers).content
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        return load_safetensors(tar.extractfile("adapter_model.safetensors").read())  # type: ignore[union-attr]


def stop_worker_at(client: TestClient, tenant: Tenant, settings: Settings, job_id: str, step: int) -> None:
    """Run the job in a thread, and stop "the worker" (as Ctrl-C or SIGTERM does) once it passed `step`."""
    result: list[str | None] = []
    thread = threading.Thread(target=lambda: result.append(run_training_job(settings, job_id)))
    thread.start()
    deadline = time.monotonic() + 120
    while client.get(f"/jobs/{job_id}", headers=tenant.headers).json()["progress"]["step"] < step:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    lifecycle.request_stop()
    try:
        thread.join(timeout=120)
    finally:
        lifecycle._stop_requested.clear()
    assert result == [None]


@pytest.mark.slow  # two training runs; the e2e fault tests stop a real worker too
def test_a_stopped_worker_hands_the_job_back_and_the_next_run_resumes_to_the_same_adapter(
    client: TestClient, tenant: Tenant, settings: Settings
) -> None:
    spec = {"n_epochs": 2, "batch_size": 1, "checkpoint_every": 4, "lora_dropout": 0.1}
    reference = start_job(client, tenant, lines=chat_lines(12), **spec)
    job_id = start_job(client, tenant, lines=chat_lines(12), **spec)  # 24 steps
    assert run_training_job(settings, reference) is not None
    stop_worker_at(client, tenant, settings, job_id, 6)
    job = client.get(f"/jobs/{job_id}", headers=tenant.headers).json()
    assert job["status"] == "queued" and job["attempt"] == 1 and job["error"] is None
    stopped_at = job["progress"]["step"]
    assert 6 <= stopped_at < 24
    assert events(client, tenant, job_id)[-1]["message"].startswith(f"the worker was stopped at step {stopped_at};")
    # Checkpointed at the step it stopped at, and sent to the queue again (besides the first message).
    checkpoints = client.get(f"/jobs/{job_id}/checkpoints", headers=tenant.headers).json()["data"]
    assert checkpoints[0]["step_number"] == stopped_at
    assert sum(job_id in m["kwargsrepr"] for m in queued_messages(settings)) == 2

    adapter_id = run_training_job(settings, job_id)
    assert adapter_id is not None
    job = client.get(f"/jobs/{job_id}", headers=tenant.headers).json()
    assert job["status"] == "succeeded" and job["attempt"] == 2
    log = events(client, tenant, job_id)
    assert f"attempt 2: resumed from checkpoint {checkpoints[0]['id']} at step {stopped_at}" in [
        e["message"] for e in log
    ]
    assert [e["data"]["step"] for e in log if e["type"] == "metrics"] == list(range(1, 25))  # each step once
    # The same adapter as the uninterrupted job's (same data, seed and hyperparameters).
    expected = adapter_tensors(
        client, tenant, client.get(f"/jobs/{reference}", headers=tenant.headers).json()["adapter_id"]
    )
    got = adapter_tensors(client, tenant, adapter_id)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_a_resumed_run_does_not_report_a_step_twice(client: TestClient, tenant: Tenant, settings: Settings) -> None:
    """A worker that died after step 7 but checkpointed at 4 trains 5-7 again: their events are not repeated."""
    job_id = start_job(client, tenant)
    first = claim(settings, job_id)
    assert first is not None
    reporter = JobReporter(settings.db_url, first)
    for step in range(1, 8):
        reporter.progress(step=step, total_steps=10, epoch=1, metrics={"train_loss": 1.0}, message=f"step {step}")
    make_stale(settings, job_id)
    second = claim(settings, job_id, heartbeat_timeout=60)
    assert second is not None and second.attempt == 2
    again = JobReporter(settings.db_url, second)
    for step in range(5, 11):
        again.progress(step=step, total_steps=10, epoch=1, metrics={"train_loss": 0.5}, message=f"step {step}")
    metrics = [e["data"] for e in events(client, tenant, job_id) if e["type"] == "metrics"]
    assert [m["step"] for m in metrics] == list(range(1, 11))
    assert [m["train_loss"] for m in metrics] == [1.0] * 7 + [0.5] * 3
    # The first attempt, if it is still alive somewhere, can change nothing now.
    with pytest.raises(JobLost):
        reporter.progress(step=8, total_steps=10, epoch=1, metrics={}, message="step 8")


# --- heartbeats, the claim, the reaper ------------------------------------------------------------
def claim(
    settings: Settings, job_id: str, *, heartbeat_timeout: float = 120.0, max_attempts: int = 3
) -> ClaimedJob | None:
    with session_scope(settings.db_url) as session:
        return state.claim(session, job_id, heartbeat_timeout=heartbeat_timeout, max_attempts=max_attempts)


def make_stale(settings: Settings, job_id: str, age: float = 600) -> None:
    with session_scope(settings.db_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(seconds=age)))


def heartbeat_of(settings: Settings, job_id: str) -> Any:
    with session_scope(settings.db_url) as session:
        return session.scalars(select(Job.heartbeat_at).where(Job.id == job_id)).one()


def test_the_heartbeat_beats_while_a_step_takes_long(client: TestClient, tenant: Tenant, settings: Settings) -> None:
    job_id = start_job(client, tenant)
    job = claim(settings, job_id)
    assert job is not None
    make_stale(settings, job_id)
    with Heartbeat(settings.db_url, job, interval=0.1):
        time.sleep(0.5)  # a long step: no progress is reported meanwhile
    assert (utcnow() - heartbeat_of(settings, job_id)).total_seconds() < 1
    # A later attempt owns it now: the old heartbeat writes nothing.
    make_stale(settings, job_id)
    assert claim(settings, job_id, heartbeat_timeout=60) is not None
    make_stale(settings, job_id)
    with Heartbeat(settings.db_url, job, interval=0.1):
        time.sleep(0.4)
    assert (utcnow() - heartbeat_of(settings, job_id)).total_seconds() > 500


def test_a_running_job_is_claimed_again_only_once_its_heartbeat_is_stale(
    client: TestClient, tenant: Tenant, settings: Settings
) -> None:
    job_id = start_job(client, tenant)
    assert claim(settings, job_id) is not None
    assert claim(settings, job_id, heartbeat_timeout=60) is None  # alive: a redelivered task is a no-op
    make_stale(settings, job_id, age=120)
    again = claim(settings, job_id, heartbeat_timeout=60)
    assert again is not None and again.attempt == 2
    assert events(client, tenant, job_id)[-1]["message"].startswith("training started again: the worker")
    make_stale(settings, job_id, age=120)
    assert claim(settings, job_id, heartbeat_timeout=60, max_attempts=2) is None  # out of attempts


def test_the_reaper_requeues_a_job_whose_worker_died_and_it_then_completes(
    client: TestClient, tenant: Tenant, settings: Settings
) -> None:
    dead = start_job(client, tenant)
    alive = start_job(client, tenant)
    for job_id in (dead, alive):
        assert claim(settings, job_id) is not None
    make_stale(settings, dead, age=settings.heartbeat_timeout_seconds + 5)
    # (In the suite's shared PostgreSQL database, earlier tests' abandoned jobs are reaped too.)
    assert dead in reap_stale_jobs(settings) and alive not in reap_stale_jobs(settings)
    assert dead not in reap_stale_jobs(settings)  # a second reaper (another replica) finds nothing more to do
    job = client.get(f"/jobs/{dead}", headers=tenant.headers).json()
    assert job["status"] == "queued" and job["attempt"] == 1
    event = events(client, tenant, dead)[-1]
    assert event["level"] == "warning" and "stopped answering" in event["message"]
    assert sum(dead in m["kwargsrepr"] for m in queued_messages(settings)) == 2  # created, then reaped
    assert client.get(f"/jobs/{alive}", headers=tenant.headers).json()["status"] == "running"
    assert run_training_job(settings, dead) is not None
    job = client.get(f"/jobs/{dead}", headers=tenant.headers).json()
    assert job["status"] == "succeeded" and job["attempt"] == 2


def test_the_reaper_fails_a_job_out_of_attempts_with_the_reason(
    client: TestClient, tenant: Tenant, settings: Settings
) -> None:
    job_id = start_job(client, tenant)
    for _ in range(settings.max_job_attempts):
        assert claim(settings, job_id, heartbeat_timeout=60) is not None
        make_stale(settings, job_id)
    storage = ObjectStorage.from_settings(settings)
    state_key = f"checkpoints/t/{job_id}/state.pt"
    storage.put_bytes(state_key, b"state")
    add_checkpoint(settings, job_id, state_bytes=5, state_key=state_key)
    assert job_id in reap_stale_jobs(settings)
    job = client.get(f"/jobs/{job_id}", headers=tenant.headers).json()
    assert job["status"] == "failed" and job["error"]["code"] == "worker_lost"
    assert f"stopped answering, {settings.max_job_attempts} times" in job["error"]["message"]
    # Ended: nothing will resume it, so its checkpoints' training states are deleted (the artifacts stay).
    assert not storage.exists(state_key)
    [checkpoint] = client.get(f"/jobs/{job_id}/checkpoints", headers=tenant.headers).json()["data"]
    with session_scope(settings.db_url) as session:
        assert session.get(Checkpoint, checkpoint["id"]).state_size_bytes == 0  # type: ignore[union-attr]


# --- storage limits -------------------------------------------------------------------------------
def test_a_tenant_past_its_storage_limit_cannot_upload_or_create_jobs(settings: Settings, make_tenant: Any) -> None:
    content = jsonl(chat_lines(8))
    limited = settings.model_copy(update={"max_stored_bytes_per_tenant": 2 * len(content) + 10})
    tenant, other = make_tenant(), make_tenant()
    with TestClient(create_app(limited)) as client:
        first = upload(client, tenant, content).json()["id"]
        assert upload(client, tenant, content).status_code == 201
        refused = upload(client, tenant, content)
        assert refused.status_code == 403, refused.text
        error = refused.json()["error"]
        assert error["code"] == "storage_quota_exceeded" and f"{3 * len(content):,}" in error["message"]
        assert upload(client, other, content).status_code == 201  # per tenant
        # Deleting a file makes room again.
        assert client.delete(f"/v1/files/{first}", headers=tenant.headers).status_code == 200
        assert upload(client, tenant, content).status_code == 201
        # A job reserves the most it may store (its dry run says how much) for as long as it is active.
        file_id = client.get("/v1/files", headers=tenant.headers).json()["data"][0]["id"]
        job_body = {"base_model": "tiny-random-llama", "training_file": file_id}
        reserve = client.post("/jobs", headers=tenant.headers, json={**job_body, "dry_run": True}).json()
        reserve = reserve["estimated_stored_bytes"]
        assert reserve > len(content)
    room_for_one_job = settings.model_copy(update={"max_stored_bytes_per_tenant": 2 * len(content) + reserve + 10})
    with TestClient(create_app(room_for_one_job)) as client:
        created = client.post("/jobs", headers=tenant.headers, json=job_body)
        assert created.status_code == 201 and created.json()["reserved_bytes"] == reserve, created.text
        # The room it reserved is taken: by neither a second job nor an upload.
        r = client.post("/jobs", headers=tenant.headers, json=job_body)
        assert r.status_code == 403 and r.json()["error"]["code"] == "storage_quota_exceeded"
        assert f"reserves the {reserve:,} bytes it may store" in r.json()["error"]["message"]
        assert upload(client, tenant, content).status_code == 403
        assert client.post("/jobs", headers=tenant.headers, json={**job_body, "dry_run": True}).status_code == 200
        # What the job stores comes out of its reservation, not on top of it; past it, it counts as stored.
        job_id = created.json()["id"]
        with session_scope(settings.db_url) as session:
            before = stored_bytes(session, tenant_id=tenant_id_of(settings, job_id))
        add_checkpoint(settings, job_id, state_bytes=reserve - 4096)
        with session_scope(settings.db_url) as session:
            assert stored_bytes(session, tenant_id=tenant_id_of(settings, job_id)) == before
        add_checkpoint(settings, job_id, state_bytes=1024**3)
        with session_scope(settings.db_url) as session:
            assert stored_bytes(session, tenant_id=tenant_id_of(settings, job_id)) > before + 1024**3 - reserve
        # Once the job ends, only what it stored counts: cancelled, with its checkpoints deleted, the room is back.
        assert client.post(f"/jobs/{job_id}/cancel", headers=tenant.headers).status_code == 200
        for checkpoint in client.get(f"/jobs/{job_id}/checkpoints", headers=tenant.headers).json()["data"]:
            deleted = client.delete(f"/jobs/{job_id}/checkpoints/{checkpoint['id']}", headers=tenant.headers)
            assert deleted.status_code == 200, deleted.text
        assert client.post("/jobs", headers=tenant.headers, json=job_body).status_code == 201


def add_checkpoint(
    settings: Settings, job_id: str, *, state_bytes: int, state_key: str = "checkpoints/x/state.pt"
) -> None:
    with session_scope(settings.db_url) as session:
        session.add(
            Checkpoint(
                id=new_id("ftckpt"),
                tenant_id=tenant_id_of(settings, job_id),
                job_id=job_id,
                attempt=1,
                step=1,
                epoch=1,
                metrics={},
                base_model="tiny-random-llama",
                method="lora",
                format="peft",
                storage_key="checkpoints/x/artifact.tar.gz",
                size_bytes=1,
                sha256="0" * 64,
                state_key=state_key,
                state_size_bytes=state_bytes,
            )
        )


def test_the_broker_settings_never_deliver_a_long_job_twice_by_themselves() -> None:
    from app.core.queue import make_celery

    for broker in ("redis://127.0.0.1:6379/0", "sqla+sqlite:////tmp/tuneforge-broker-test.db"):
        conf = make_celery(broker, "training").conf
        # Acknowledged when the job ends; given back if the worker dies; one job at a time per worker.
        assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    redis_conf = make_celery("redis://127.0.0.1:6379/0", "training").conf
    # An unacknowledged message would come back after this: a week, longer than any job; the reaper decides.
    assert redis_conf.broker_transport_options["visibility_timeout"] >= 7 * 24 * 3600


def test_the_embedded_broker_is_polled_every_tenth_of_a_second_and_delivers(tmp_path: Path) -> None:
    """A worker waiting on the embedded SQLite broker finds a new job within 0.1 s, not kombu's default second."""
    from app.core.queue import TRAINING_TASK, make_celery

    broker = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    sender, worker = make_celery(broker, "training"), make_celery(broker, "training")
    sender.send_task(TRAINING_TASK, kwargs={"job_id": "job-1"}, queue="training")
    with worker.connection_for_read() as conn:
        assert conn.transport.polling_interval == 0.1
        received: list[dict] = []
        with conn.SimpleQueue("training") as queue:
            message = queue.get(timeout=5)
            received.append(message.payload)
            message.ack()
    assert received and received[0][1] == {"job_id": "job-1"}  # Celery's protocol 2 body: (args, kwargs, embed)


def test_a_job_checkpoints_when_checkpoint_minutes_have_passed(model_cache_dir: Path) -> None:
    """Without checkpoint_every, a long epoch still checkpoints every TUNEFORGE_CHECKPOINT_MINUTES."""
    reporter, checkpoints = MemoryReporter(), MemoryCheckpoints()
    recipe = recipe_for(model_cache_dir, reporter, checkpointer=checkpoints, n_epochs=1, batch_size=2)  # 4 steps
    recipe.limits = dataclasses.replace(recipe.limits, checkpoint_minutes=1e-9)  # always overdue
    recipe.setup()
    recipe.train()
    assert [step for step, _ in checkpoints.saved] == [1, 2, 3, 4]  # the last one is the epoch's end
    quiet = MemoryCheckpoints()
    recipe = recipe_for(model_cache_dir, MemoryReporter(), checkpointer=quiet, n_epochs=1, batch_size=2)
    recipe.setup()
    recipe.train()
    assert [step for step, _ in quiet.saved] == [4]  # by default: the epoch's end only


# --- resuming deletes no checkpoint --------------------------------------------------------------
def stopped_with_checkpoints(
    client: TestClient, tenant: Tenant, settings: Settings
) -> tuple[str, list[dict[str, Any]]]:
    """A 12-step job stopped (handed back) after step 5, with its checkpoints (every 2 steps and where it stopped)."""
    job_id = start_job(client, tenant, lines=chat_lines(12), n_epochs=1, batch_size=1, checkpoint_every=2)
    stop_worker_at(client, tenant, settings, job_id, 5)
    kept = client.get(f"/jobs/{job_id}/checkpoints", headers=tenant.headers).json()["data"]
    assert len(kept) >= 2
    return job_id, kept


def assert_kept_and_downloadable(client: TestClient, tenant: Tenant, job_id: str, kept: list[dict[str, Any]]) -> None:
    """Every checkpoint in `kept` is still listed, and downloads with its sha256."""
    listed = {c["id"]: c for c in client.get(f"/jobs/{job_id}/checkpoints", headers=tenant.headers).json()["data"]}
    for checkpoint in kept:
        assert checkpoint["id"] in listed, (checkpoint["id"], sorted(listed))
        download = client.get(checkpoint["download_url"], headers=tenant.headers)
        assert download.status_code == 200, download.text
        assert hashlib.sha256(download.content).hexdigest() == checkpoint["sha256"]


def state_key_of(settings: Settings, checkpoint_id: str) -> str:
    with session_scope(settings.db_url) as session:
        return str(session.scalars(select(Checkpoint.state_key).where(Checkpoint.id == checkpoint_id)).one())


@pytest.mark.slow  # fault injection over several runs
def test_a_checkpoint_whose_state_is_damaged_is_kept_and_the_run_resumes_from_the_one_before(
    client: TestClient, tenant: Tenant, settings: Settings
) -> None:
    job_id, kept = stopped_with_checkpoints(client, tenant, settings)
    latest, before = kept[0], kept[1]
    storage = ObjectStorage.from_settings(settings)
    storage.put_bytes(state_key_of(settings, latest["id"]), b"not a checkpoint")  # damaged in storage
    assert run_training_job(settings, job_id) is not None
    # The damaged checkpoint's artifact is intact: still listed, downloaded and served.
    assert_kept_and_downloadable(client, tenant, job_id, [latest])
    prompt = {"prompt": "Name fruit number 1.", "max_tokens": 4, "temperature": 0, "adapter_id": latest["id"]}
    assert client.post("/generate", headers=tenant.headers, json=prompt).status_code == 200
    log = events(client, tenant, job_id)
    messages = [e["message"] for e in log]
    assert set_aside_message(latest["id"], latest["step_number"]) in messages
    assert f"attempt 2: resumed from checkpoint {before['id']} at step {before['step_number']}" in messages
    assert [e["data"]["step"] for e in log if e["type"] == "metrics"] == list(range(1, 13))


def fail_state_downloads(monkeypatch: pytest.MonkeyPatch, error: Callable[[], BaseException]) -> list[str]:
    """Every download of a checkpoint's training state raises `error()`; returns the keys asked for."""
    download = ObjectStorage.download
    asked: list[str] = []

    def failing(self: ObjectStorage, key: str, dest: Path) -> str:
        if key.endswith("/state.pt"):
            asked.append(key)
            raise error()
        return download(self, key, dest)

    monkeypatch.setattr(ObjectStorage, "download", failing)
    return asked


TRANSIENT_FAILURES: dict[str, Callable[[], BaseException]] = {
    "object store outage": lambda: obstore.exceptions.GenericError("connection refused, after retries"),
    "full temp dir": lambda: OSError(errno.ENOSPC, "No space left on device"),
}


@pytest.mark.slow  # fault injection over two runs a case
@pytest.mark.parametrize("failure", TRANSIENT_FAILURES)
def test_a_checkpoint_that_cannot_be_read_for_now_hands_the_job_back_and_deletes_nothing(
    failure: str, client: TestClient, tenant: Tenant, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id, kept = stopped_with_checkpoints(client, tenant, settings)
    storage = ObjectStorage.from_settings(settings)
    prefix = f"checkpoints/{tenant_id_of(settings, job_id)}/{job_id}"
    objects = sorted(storage.list_keys(prefix))
    sent = sum(job_id in m["kwargsrepr"] for m in queued_messages(settings))
    asked = fail_state_downloads(monkeypatch, TRANSIENT_FAILURES[failure])
    outcome = run_job(settings, job_id)
    assert asked and outcome.status == "handed_back", outcome
    job = client.get(f"/jobs/{job_id}", headers=tenant.headers).json()
    assert job["status"] == "queued" and job["error"] is None
    assert events(client, tenant, job_id)[-1]["message"].startswith(CHECKPOINT_UNREADABLE_MESSAGE)
    assert sum(job_id in m["kwargsrepr"] for m in queued_messages(settings)) == sent + 1  # sent again
    assert sorted(storage.list_keys(prefix)) == objects  # every artifact and every training state
    assert_kept_and_downloadable(client, tenant, job_id, kept)

    monkeypatch.undo()  # the store (or the disk) is back: the next attempt resumes from the latest checkpoint
    assert run_training_job(settings, job_id) is not None
    messages = [e["message"] for e in events(client, tenant, job_id)]
    assert f"attempt 3: resumed from checkpoint {kept[0]['id']} at step {kept[0]['step_number']}" in messages


@pytest.mark.slow  # a race over two runs
def test_a_cancel_racing_a_resume_deletes_no_checkpoint_and_the_job_ends_cancelled(
    client: TestClient, tenant: Tenant, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id, kept = stopped_with_checkpoints(client, tenant, settings)
    download = ObjectStorage.download

    def cancelled_meanwhile(self: ObjectStorage, key: str, dest: Path) -> str:
        if key.endswith("/state.pt") and client.get(f"/jobs/{job_id}", headers=tenant.headers).json()["status"] == (
            "running"
        ):
            # The user cancels while the worker fetches the state: the cancel deletes the training states.
            assert client.post(f"/jobs/{job_id}/cancel", headers=tenant.headers).status_code == 200
            assert not self.exists(key)
        return download(self, key, dest)

    monkeypatch.setattr(ObjectStorage, "download", cancelled_meanwhile)
    outcome = run_job(settings, job_id)
    assert outcome.status == "cancelled", outcome
    job = client.get(f"/jobs/{job_id}", headers=tenant.headers).json()
    assert job["status"] == "cancelled" and job["adapter_id"] is None
    assert events(client, tenant, job_id)[-1]["message"] == "training stopped: the job was cancelled"
    assert_kept_and_downloadable(client, tenant, job_id, kept)


# --- the database's clock, and queued jobs whose task was lost ---------------------------------------
class SkewedClock:
    """This process's wall clock, `seconds` off (what `datetime.now` answers in app code): a host whose clock drifts."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch

    def set(self, seconds: float) -> None:
        real = datetime

        class Skewed(datetime):
            @classmethod
            def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
                return real.now(tz) + timedelta(seconds=seconds)

        self.monkeypatch.setattr(models, "datetime", Skewed)

    def reset(self) -> None:
        self.monkeypatch.setattr(models, "datetime", datetime)


def test_a_worker_whose_clock_is_two_minutes_off_keeps_its_job_and_takes_no_live_one(
    client: TestClient, tenant: Tenant, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Heartbeats are written and compared with the database's clock: the hosts' clocks play no part."""
    settings = settings.model_copy(update={"heartbeat_timeout_seconds": 60})
    job_id = start_job(client, tenant)
    clock = SkewedClock(monkeypatch)
    clock.set(-120)  # the worker's host
    job = lifecycle.claim(settings, job_id)
    assert job is not None
    JobReporter(settings.db_url, job).progress(step=1, total_steps=4, epoch=1, metrics={}, message="step 1")
    with Heartbeat(settings.db_url, job, interval=0.1):
        time.sleep(0.3)
    clock.reset()  # the API's host: its reaper finds the job alive
    assert job_id not in reap_stale_jobs(settings)
    shown = client.get(f"/jobs/{job_id}", headers=tenant.headers).json()
    assert shown["status"] == "running" and shown["attempt"] == 1
    assert abs(shown["heartbeat_at"] - time.time()) < 30  # when its worker last reported, not two minutes before
    clock.set(+120)  # another worker's host, ahead: a delivery of the same task claims nothing
    assert lifecycle.claim(settings, job_id) is None
    clock.reset()
    assert client.get(f"/jobs/{job_id}", headers=tenant.headers).json()["attempt"] == 1


def test_a_queued_job_whose_task_was_lost_is_sent_again_and_runs_once(
    client: TestClient, tenant: Tenant, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state, "enqueue", lambda *_, **__: None)  # the API died between the commit and the send
    job_id = start_job(client, tenant)
    monkeypatch.undo()
    assert client.get(f"/jobs/{job_id}", headers=tenant.headers).json()["status"] == "queued"
    assert not [m for m in queued_messages(settings) if job_id in m["kwargsrepr"]]
    assert job_id not in resend_queued_jobs(settings)  # not before `queued_resend_seconds` (300 by default)

    waiting = settings.model_copy(update={"reaper_seconds": 0.2, "queued_resend_seconds": 1.0})
    with Reaper(waiting):  # the reaper of every API and worker process
        deadline = time.monotonic() + 30
        while not [m for m in queued_messages(settings) if job_id in m["kwargsrepr"]]:
            assert time.monotonic() < deadline, "the lost task was never sent again"
            time.sleep(0.1)
    # Sent again (and, waiting longer, again): every delivery after the first claims nothing.
    first, second = run_job(settings, job_id), run_job(settings, job_id)
    assert (first.status, second.status) == ("succeeded", "not_claimed")
    job = client.get(f"/jobs/{job_id}", headers=tenant.headers).json()
    assert job["status"] == "succeeded" and job["attempt"] == 1
    started = [e for e in events(client, tenant, job_id) if e["data"].get("status") == "running"]
    assert len(started) == 1


def test_a_worker_the_reaper_gave_up_on_can_change_nothing(
    client: TestClient, tenant: Tenant, settings: Settings
) -> None:
    job_id = start_job(client, tenant)
    job = claim(settings, job_id)
    assert job is not None
    make_stale(settings, job_id)
    assert job_id in reap_stale_jobs(settings)
    # It comes back (the database was away, say) and meets an error: the queued job is not failed.
    JobAttempt(settings, ObjectStorage.from_settings(settings), job).fail("boom", code=ErrorCode.internal_error)
    assert client.get(f"/jobs/{job_id}", headers=tenant.headers).json()["status"] == "queued"
    with pytest.raises(JobLost):
        JobReporter(settings.db_url, job).progress(step=1, total_steps=2, epoch=1, metrics={}, message="step 1")
    with pytest.raises(JobLost):
        JobReporter(settings.db_url, job).event("log", "anything")


@pytest.mark.slow  # a race over two attempts
def test_a_job_requeued_by_the_reaper_while_its_old_attempt_saves_a_checkpoint_ends_cleanly_for_that_attempt(
    client: TestClient, tenant: Tenant, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old attempt's checkpoint finds the job queued again: it is no longer that attempt's (JobLost, not a
    cancel), so the attempt stores nothing, writes no event and ends without an exception escaping to Celery; the
    next worker trains the job to the end."""
    job_id = start_job(client, tenant, n_epochs=1, batch_size=2, checkpoint_every=1)
    save = JobCheckpoints.save

    def reaped_first(self: JobCheckpoints, recipe: TrainingRecipe) -> None:
        make_stale(settings, job_id)  # as if this worker had stopped answering for a while...
        assert job_id in reap_stale_jobs(settings)  # ...and a reaper re-queued the job meanwhile
        save(self, recipe)

    monkeypatch.setattr(JobCheckpoints, "save", reaped_first)
    outcome = run_job(settings, job_id)
    assert outcome.status == "left_to_reaper" and "taken over" in outcome.detail
    job = client.get(f"/jobs/{job_id}", headers=tenant.headers).json()
    assert job["status"] == "queued" and job["attempt"] == 1
    assert client.get(f"/jobs/{job_id}/checkpoints", headers=tenant.headers).json()["data"] == []
    storage = ObjectStorage.from_settings(settings)
    assert storage.list_keys(f"checkpoints/{tenant_id_of(settings, job_id)}/{job_id}") == []  # its objects went
    log = events(client, tenant, job_id)
    assert log[-1]["data"]["status"] == "queued" and "stopped answering" in log[-1]["message"]
    assert not [e for e in log if "cancelled" in e["message"]]

    monkeypatch.setattr(JobCheckpoints, "save", save)
    assert run_training_job(settings, job_id) is not None
    job = client.get(f"/jobs/{job_id}", headers=tenant.headers).json()
    assert job["status"] == "succeeded" and job["attempt"] == 2


def test_a_cancelled_job_keeps_its_checkpoints_artifacts_and_drops_their_training_states(
    client: TestClient, tenant: Tenant, settings: Settings
) -> None:
    job_id = start_job(client, tenant, lines=chat_lines(12), n_epochs=1, batch_size=1, checkpoint_every=2)
    stop_worker_at(client, tenant, settings, job_id, 3)  # handed back: queued, with its checkpoints
    storage = ObjectStorage.from_settings(settings)
    prefix = f"checkpoints/{tenant_id_of(settings, job_id)}/{job_id}"
    assert any(k.endswith("/state.pt") for k in storage.list_keys(prefix))
    assert client.post(f"/jobs/{job_id}/cancel", headers=tenant.headers).status_code == 200
    keys = storage.list_keys(prefix)
    assert keys and all(k.endswith("/artifact.tar.gz") for k in keys)
    [latest, *_] = client.get(f"/jobs/{job_id}/checkpoints", headers=tenant.headers).json()["data"]
    prompt = {"prompt": "Name fruit number 1.", "max_tokens": 4, "temperature": 0, "adapter_id": latest["id"]}
    assert client.post("/generate", headers=tenant.headers, json=prompt).status_code == 200


def test_a_job_that_would_pass_the_storage_quota_fails_and_keeps_its_checkpoints(
    client: TestClient, tenant: Tenant, settings: Settings
) -> None:
    """Workers count what they store against the tenant's quota before they store it: a checkpoint (or adapter)
    past it fails the job with storage_quota_exceeded, and the checkpoints stored before it stay."""

    def used(job_id: str) -> int:  # by everything but the job's own reservation, which its checks leave out
        with session_scope(settings.db_url) as session:
            return stored_bytes(session, tenant_id=tenant_id_of(settings, job_id), excluding_job=job_id)

    def run_with_room(job_id: str, room: int) -> dict[str, Any]:
        limited = settings.model_copy(update={"max_stored_bytes_per_tenant": used(job_id) + room})
        assert run_training_job(limited, job_id) is None
        return client.get(f"/jobs/{job_id}", headers=tenant.headers).json()  # type: ignore[no-any-return]

    hyperparameters = {"n_epochs": 1, "batch_size": 4, "checkpoint_every": 1, "keep_checkpoints": 5}
    # No room at all: the first checkpoint is refused before anything is stored; its message says its size.
    first = start_job(client, tenant, **hyperparameters)
    before = used(first)
    job = run_with_room(first, 1)
    assert job["status"] == "failed" and job["error"]["code"] == "storage_quota_exceeded", job
    assert "checkpoint" in job["error"]["message"] and "kept" in job["error"]["message"]
    assert used(first) == before  # nothing of it was stored
    needed = job["error"]["message"].split("stored bytes to ")[1].split(" ")[0]  # "12,345," with its commas
    checkpoint_bytes = int("".join(ch for ch in needed if ch.isdigit())) - before
    assert checkpoint_bytes > 0
    # POST /jobs reserved room for every checkpoint it keeps, each as large as this one (artifact and state).
    assert job["reserved_bytes"] >= hyperparameters["keep_checkpoints"] * checkpoint_bytes
    # Room for one checkpoint and a half: the first is stored, the second refused; the first stays.
    second = start_job(client, tenant, **hyperparameters)
    job = run_with_room(second, checkpoint_bytes * 3 // 2)
    assert job["status"] == "failed" and job["error"]["code"] == "storage_quota_exceeded", job
    kept = client.get(f"/jobs/{second}/checkpoints", headers=tenant.headers).json()["data"]
    assert [c["step_number"] for c in kept] == [1]
    assert client.get(kept[0]["download_url"], headers=tenant.headers).status_code == 200
