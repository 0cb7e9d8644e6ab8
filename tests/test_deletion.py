"""Tenants free space: DELETE /adapters/{id}, /jobs/{id}/checkpoints/{id}, /jobs/{id} and OpenAI's
DELETE /v1/models/{model}; and what is stored agrees with the rows that name it (objects deleted only once the
rows' deletion is committed, objects written for rows never committed cleaned up, model blobs shared by a model
being added never deleted)."""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from openai import NotFoundError, OpenAI, PermissionDeniedError
from sqlalchemy import event
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from app.core.db import session_scope
from app.core.models import File
from app.core.settings import Settings
from app.core.storage import ObjectStorage
from app.jobs import state
from app.main import create_app
from app.ml.models import BLOB_PREFIX, ModelStore
from app.models.service import delete_unused_blobs, get_model, register_model, remove_model
from tests.conftest import Tenant, chat_lines, jsonl, upload
from tests.model_factories import build_tiny_model
from tests.test_base_models import register, tuneforge, upload_for
from tests.test_inference_api import live, running, wait_until
from tests.test_worker import events, start_job
from worker.runner import run_training_job

PROMPT = "The secret word is"


def stored(settings: Settings, prefix: str) -> list[str]:
    return ObjectStorage.from_settings(settings).list_keys(prefix)


def train(client: TestClient, tenant: Tenant, settings: Settings, **hyperparameters: Any) -> tuple[str, str]:
    """A succeeded job (2 epochs of 4 steps, a checkpoint at each epoch's end): its id and its adapter's."""
    lines = [json.dumps({"prompt": PROMPT, "completion": " plum"})] * 8
    job_id = start_job(client, tenant, lines, batch_size=2, learning_rate=0.05, **hyperparameters)
    adapter_id = run_training_job(settings, job_id)
    assert adapter_id is not None
    return job_id, adapter_id


def stored_bytes(client: TestClient, tenant: Tenant, job_id: str) -> int:
    """What the tenant keeps, as its lists say: files, adapters, the job's checkpoints."""
    files = client.get("/v1/files?limit=100", headers=tenant.headers).json()["data"]
    adapters = client.get("/adapters?limit=100", headers=tenant.headers).json()["data"]
    checkpoints = client.get(f"/jobs/{job_id}/checkpoints", headers=tenant.headers).json()["data"]
    return sum(f["bytes"] for f in files) + sum(a["size_bytes"] for a in [*adapters, *checkpoints])


# --- tenants free space ------------------------------------------------------------------------------------
def test_a_deleted_adapter_is_gone_from_lists_storage_and_the_quota(
    client: TestClient, tenant: Tenant, make_tenant: Any, settings: Settings
) -> None:
    job_id, adapter_id = train(client, tenant, settings)
    assert stored(settings, "adapters") != []
    other = make_tenant()
    assert client.delete(f"/adapters/{adapter_id}", headers=other.headers).status_code == 404
    assert client.get(f"/adapters/{adapter_id}", headers=tenant.headers).status_code == 200

    # The tenant is at its limit: nothing more can be stored until it deletes something.
    used = stored_bytes(client, tenant, job_id)
    adapter_bytes = client.get(f"/adapters/{adapter_id}", headers=tenant.headers).json()["size_bytes"]
    limited = create_app(settings.model_copy(update={"max_stored_bytes_per_tenant": used}))
    small = jsonl(chat_lines(2))
    assert len(small) < adapter_bytes
    with TestClient(limited) as at_limit:
        refused = upload(at_limit, tenant, small)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "storage_quota_exceeded"

        r = at_limit.delete(f"/adapters/{adapter_id}", headers=tenant.headers)
        assert r.status_code == 200, r.text
        assert r.json() == {"id": adapter_id, "object": "adapter", "deleted": True}
        assert upload(at_limit, tenant, small).status_code == 201  # the adapter's bytes are free again

    assert client.get(f"/adapters/{adapter_id}", headers=tenant.headers).status_code == 404
    assert client.get(f"/adapters/{adapter_id}/download", headers=tenant.headers).status_code == 404
    assert client.delete(f"/adapters/{adapter_id}", headers=tenant.headers).status_code == 404
    assert client.get("/adapters", headers=tenant.headers).json()["data"] == []
    models = [m["id"] for m in client.get("/v1/models", headers=tenant.headers).json()["data"]]
    assert adapter_id not in models
    r = client.post("/generate", headers=tenant.headers, json={"adapter_id": adapter_id, "prompt": PROMPT})
    assert r.status_code == 404
    assert stored(settings, "adapters") == []
    # The job keeps its record of what it published; its checkpoints stay.
    assert client.get(f"/jobs/{job_id}", headers=tenant.headers).json()["adapter_id"] == adapter_id
    assert len(client.get(f"/jobs/{job_id}/checkpoints", headers=tenant.headers).json()["data"]) == 2


def test_a_deleted_checkpoint_is_gone_and_the_others_stay(
    client: TestClient, tenant: Tenant, make_tenant: Any, settings: Settings
) -> None:
    job_id, adapter_id = train(client, tenant, settings)
    checkpoints = client.get(f"/jobs/{job_id}/checkpoints", headers=tenant.headers).json()["data"]
    latest, earlier = (c["id"] for c in checkpoints)
    prefix = "checkpoints"
    assert any(latest in key for key in stored(settings, prefix))

    other = make_tenant()
    assert client.delete(f"/jobs/{job_id}/checkpoints/{latest}", headers=other.headers).status_code == 404
    other_job, _ = train(client, other, settings)
    assert client.delete(f"/jobs/{other_job}/checkpoints/{latest}", headers=other.headers).status_code == 404

    r = client.delete(f"/jobs/{job_id}/checkpoints/{latest}", headers=tenant.headers)
    assert r.status_code == 200, r.text
    assert r.json() == {"id": latest, "object": "fine_tuning.job.checkpoint", "deleted": True}
    listed = client.get(f"/jobs/{job_id}/checkpoints", headers=tenant.headers).json()["data"]
    assert [c["id"] for c in listed] == [earlier]
    assert client.get(f"/adapters/{latest}/download", headers=tenant.headers).status_code == 404
    assert client.get(f"/adapters/{earlier}/download", headers=tenant.headers).status_code == 200
    assert not any(latest in key for key in stored(settings, prefix))
    assert any(earlier in key for key in stored(settings, prefix))
    again = client.delete(f"/jobs/{job_id}/checkpoints/{latest}", headers=tenant.headers)
    assert again.status_code == 404 and again.json()["error"]["param"] == "checkpoint_id"
    assert client.get(f"/adapters/{adapter_id}", headers=tenant.headers).status_code == 200


def test_a_deleted_job_takes_its_events_checkpoints_and_adapter_along(
    client: TestClient, tenant: Tenant, make_tenant: Any, settings: Settings
) -> None:
    job_id, adapter_id = train(client, tenant, settings)
    [checkpoint, _] = client.get(f"/jobs/{job_id}/checkpoints", headers=tenant.headers).json()["data"]
    training_file = client.get(f"/jobs/{job_id}", headers=tenant.headers).json()["training_file"]
    assert stored(settings, "checkpoints") and stored(settings, "adapters")

    # A job that has not ended is refused, naming its state; another tenant's is not found.
    queued = start_job(client, tenant)
    refused = client.delete(f"/jobs/{queued}", headers=tenant.headers)
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "job_not_ended" and "is queued" in refused.json()["error"]["message"]
    assert client.delete(f"/jobs/{job_id}", headers=make_tenant().headers).status_code == 404

    r = client.delete(f"/jobs/{job_id}", headers=tenant.headers)
    assert r.status_code == 200, r.text
    assert r.json() == {"id": job_id, "object": "fine_tuning.job", "deleted": True}
    for path in (f"/jobs/{job_id}", f"/jobs/{job_id}/events", f"/jobs/{job_id}/checkpoints", f"/jobs/{job_id}/metrics"):
        assert client.get(path, headers=tenant.headers).status_code == 404, path
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=tenant.headers).status_code == 404
    assert [j["id"] for j in client.get("/jobs", headers=tenant.headers).json()["data"]] == [queued]
    assert client.get(f"/adapters/{adapter_id}", headers=tenant.headers).status_code == 404
    assert client.get(f"/adapters/{checkpoint['id']}/download", headers=tenant.headers).status_code == 404
    assert stored(settings, "checkpoints") == []
    assert stored(settings, "adapters") == []
    assert client.get(f"/v1/files/{training_file}", headers=tenant.headers).status_code == 200  # files stay
    assert client.delete(f"/jobs/{job_id}", headers=tenant.headers).status_code == 404

    # Once cancelled, the queued one can go too; the Idempotency-Key that created it may create a new job.
    file_id = upload(client, tenant, jsonl(chat_lines(4))).json()["id"]
    body = {"base_model": "tiny-random-llama", "training_file": file_id}
    keyed = {**tenant.headers, "Idempotency-Key": "deleted-job"}
    first = client.post("/jobs", headers=keyed, json=body).json()["id"]
    for created in (queued, first):
        assert client.post(f"/jobs/{created}/cancel", headers=tenant.headers).status_code == 200
        assert client.delete(f"/jobs/{created}", headers=tenant.headers).status_code == 200
    second = client.post("/jobs", headers=keyed, json=body)
    assert second.status_code == 201 and second.json()["id"] != first


def test_the_openai_client_deletes_a_fine_tuned_model(
    client: TestClient, tenant: Tenant, make_tenant: Any, settings: Settings
) -> None:
    _, adapter_id = train(client, tenant, settings)
    with live(create_app(settings)) as url:
        openai = OpenAI(base_url=f"{url}/v1", api_key=tenant.key, max_retries=0)
        with pytest.raises(NotFoundError):
            OpenAI(base_url=f"{url}/v1", api_key=make_tenant().key, max_retries=0).models.delete(adapter_id)
        with pytest.raises(PermissionDeniedError) as base:
            openai.models.delete("tiny-random-llama")
        assert base.value.code == "model_not_deletable"
        with pytest.raises(NotFoundError):
            openai.models.delete("no-such-model")

        deleted = openai.models.delete(adapter_id)
        assert (deleted.id, deleted.object, deleted.deleted) == (adapter_id, "model", True)
        assert adapter_id not in [m.id for m in openai.models.list()]
        with pytest.raises(NotFoundError):
            openai.models.retrieve(adapter_id)
        with pytest.raises(NotFoundError):
            openai.completions.create(model=adapter_id, prompt=PROMPT, max_tokens=2)
        with pytest.raises(NotFoundError):
            openai.models.delete(adapter_id)
    assert stored(settings, "adapters") == []


@pytest.mark.slow  # a generation held open across a deletion
def test_a_generation_running_with_an_adapter_finishes_when_it_is_deleted(
    client: TestClient, tenant: Tenant, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, adapter_id = train(client, tenant, settings)
    app = create_app(settings)
    with live(app) as url:
        body = {"adapter_id": adapter_id, "prompt": "Once upon a time", "temperature": 0}
        probe = httpx.post(f"{url}/generate", headers=tenant.headers, json={**body, "max_tokens": 60}, timeout=120)
        assert probe.json()["finish_reason"] == "length"  # greedy: this prompt runs to max_tokens
        runner = app.state.engine.runner
        step = runner.step

        def slow_step(*args: Any) -> None:  # 60 steps: about 1.2 s, the time to delete the adapter meanwhile
            time.sleep(0.02)
            step(*args)

        monkeypatch.setattr(runner, "step", slow_step)
        pieces = []
        with httpx.stream(
            "POST", f"{url}/generate", headers=tenant.headers, json={**body, "max_tokens": 60, "stream": True}
        ) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            pieces.append(json.loads(first.removeprefix("data: ")))
            assert wait_until(lambda: running(app) == 1)
            deleted = httpx.delete(f"{url}/adapters/{adapter_id}", headers=tenant.headers, timeout=30)
            assert deleted.status_code == 200 and running(app) == 1  # deleted while the request runs
            again = httpx.post(f"{url}/generate", headers=tenant.headers, json={**body, "max_tokens": 2}, timeout=30)
            assert again.status_code == 404
            for line in lines:
                if line.startswith("data: ") and line != "data: [DONE]":
                    pieces.append(json.loads(line.removeprefix("data: ")))
    assert "".join(p["text"] for p in pieces) == probe.json()["text"]  # the whole text, as before the deletion
    assert "length" in [p["finish_reason"] for p in pieces] and pieces[-1]["usage"]["completion_tokens"] == 60
    assert stored(settings, "adapters") == []


# --- objects and rows agree ----------------------------------------------------------------------------------
def test_a_file_deletion_that_is_not_committed_keeps_the_files_object(
    client: TestClient, tenant: Tenant, settings: Settings
) -> None:
    file_id = upload(client, tenant, jsonl(chat_lines(4))).json()["id"]

    def note_a_deleted_file(session: Session, _context: Any) -> None:
        if any(isinstance(row, File) and row.deleted_at is not None for row in session.dirty):
            session.info["deletes a file"] = True

    def fail_the_commit(session: Session) -> None:
        if session.info.pop("deletes a file", False):
            raise OperationalError("COMMIT", {}, Exception("the database went away"))

    event.listen(Session, "after_flush", note_a_deleted_file)
    event.listen(Session, "before_commit", fail_the_commit)
    try:
        assert client.delete(f"/v1/files/{file_id}", headers=tenant.headers).status_code == 503
    finally:
        event.remove(Session, "after_flush", note_a_deleted_file)
        event.remove(Session, "before_commit", fail_the_commit)
    assert client.get(f"/v1/files/{file_id}", headers=tenant.headers).status_code == 200
    assert len(stored(settings, "datasets")) == 1  # the file still listed can still be trained on
    job = client.post(
        "/jobs", headers=tenant.headers, json={"base_model": "tiny-random-llama", "training_file": file_id}
    )
    assert job.status_code == 201
    assert run_training_job(settings, job.json()["id"]) is not None


def test_an_adapter_whose_row_is_not_committed_is_not_left_in_storage(
    client: TestClient, tenant: Tenant, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = start_job(client, tenant, n_epochs=1)
    transition = state.transition

    def database_lost_at_publishing(session: Session, job: str, name: str, **kwargs: Any) -> bool:
        if name == "succeed":
            raise OperationalError("UPDATE jobs", {}, Exception("the database went away"))
        return transition(session, job, name, **kwargs)

    monkeypatch.setattr(state, "transition", database_lost_at_publishing)
    assert run_training_job(settings.model_copy(update={"db_retry_seconds": 0}), job_id) is None
    assert client.get(f"/jobs/{job_id}", headers=tenant.headers).json()["status"] == "running"  # the reaper's now
    assert stored(settings, "adapters") == []
    assert client.get("/adapters", headers=tenant.headers).json()["data"] == []
    assert [e["type"] for e in events(client, tenant, job_id)].count("checkpoint") == 1  # checkpoints stay


@pytest.mark.parametrize("backend", ["embedded", "production"], indirect=True)
def test_models_remove_never_deletes_a_blob_that_a_model_being_added_uses(
    client: TestClient, tenant: Tenant, settings: Settings, tmp_path: Path
) -> None:
    """`models add` finds a blob stored (another model's), then `models remove` of that model runs to the end
    before the add commits: the blob the new model uses is in the store when it is registered."""
    # Bytes of their own, and ids: the tests share one PostgreSQL database, where other models stay registered.
    folder = build_tiny_model("llama", tmp_path / "model", seed=random.randrange(1 << 30))
    first, second = (f"tiny-{name}-{uuid.uuid4().hex[:6]}" for name in ("first", "second"))
    register(settings, first, "--path", folder)
    n_files = len(list(folder.iterdir()))
    checked, resume = threading.Event(), threading.Event()

    class PausedStorage(ObjectStorage):
        calls = 0

        def exists(self, key: str) -> bool:
            found = super().exists(key)
            PausedStorage.calls += 1
            if PausedStorage.calls == n_files:  # every file found stored: about to commit the new model
                checked.set()
                resume.wait(60)
            return found

    plain = ObjectStorage.from_settings(settings)
    storage = PausedStorage(plain._store, plain.url)
    errors: list[BaseException] = []

    def add() -> None:
        try:
            with session_scope(settings.db_url) as session:
                register_model(
                    session,
                    store=ModelStore(tmp_path / "adding-cache", storage),
                    storage=storage,
                    scratch_dir=tmp_path / "scratch",
                    model_id=second,
                    source="path",
                    location=str(folder),
                )
        except BaseException as exc:
            errors.append(exc)

    adding = threading.Thread(target=add)
    adding.start()
    try:
        assert checked.wait(60)
        removed = tuneforge(settings, "models", "remove", first)
        assert removed.returncode == 0, removed.stderr
    finally:
        resume.set()
        adding.join(60)
    assert not errors, errors
    assert len(stored(settings, BLOB_PREFIX)) == n_files
    fresh = ModelStore(tmp_path / "another-machine", ObjectStorage.from_settings(settings))
    with session_scope(settings.db_url) as session:
        record = get_model(session, model_id=second)
    assert (fresh.model_dir(record) / "config.json").exists()  # every file fetched and checked
    file_id = upload_for(client, tenant, jsonl(chat_lines(4)), base_model=second)
    assert file_id.status_code == 201, file_id.text
    # Its blobs that no other model uses go with it. Its weights are its own; on PostgreSQL, other tests' tiny models
    # of the same architecture, registered in the shared database at any moment, may share its config and tokenizer
    # files, so only on the embedded backend is the store then empty.
    removed = tuneforge(settings, "models", "remove", second)
    assert re.fullmatch(rf"removed {second} \(\d+ stored files deleted\)\n", removed.stdout), removed.stdout
    assert not set(stored(settings, BLOB_PREFIX)) & {f.blob_key for f in record.files if f.is_weights}
    if settings.db_url.startswith("sqlite"):
        assert removed.stdout == f"removed {second} ({n_files} stored files deleted)\n"
        assert stored(settings, BLOB_PREFIX) == []


@pytest.mark.parametrize("backend", ["embedded", pytest.param("production", marks=pytest.mark.slow)], indirect=True)
def test_a_models_remove_waits_for_a_model_being_added_and_keeps_the_blobs_it_uses(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other order: the add has checked its blobs and is about to commit when the removal of the other model
    that uses them comes to delete them; the removal waits for the add, and then keeps them."""
    folder = build_tiny_model("llama", tmp_path / "model", seed=random.randrange(1 << 30))
    first, second = (f"tiny-{name}-{uuid.uuid4().hex[:6]}" for name in ("first", "second"))
    register(settings, first, "--path", folder)
    n_files = len(list(folder.iterdir()))
    storage = ObjectStorage.from_settings(settings)
    committing, resume = threading.Event(), threading.Event()
    adopt = ModelStore.adopt

    def slow_adopt(self: ModelStore, record: Any, stage: Path) -> None:  # its row is flushed, not yet committed
        committing.set()
        resume.wait(60)
        adopt(self, record, stage)

    monkeypatch.setattr(ModelStore, "adopt", slow_adopt)

    def add() -> None:
        with session_scope(settings.db_url) as session:
            register_model(
                session,
                store=ModelStore(tmp_path / "adding-cache", storage),
                storage=storage,
                scratch_dir=tmp_path / "scratch",
                model_id=second,
                source="path",
                location=str(folder),
            )

    deleted: list[int] = []

    def remove() -> None:  # what `tuneforge models remove` does
        with session_scope(settings.db_url) as session:
            record = remove_model(session, model_id=first)
        with session_scope(settings.db_url) as session:
            deleted.append(delete_unused_blobs(session, storage=storage, files=record.files))

    adding, removing = threading.Thread(target=add), threading.Thread(target=remove)
    adding.start()
    try:
        assert committing.wait(60)
        removing.start()
        removing.join(3)
        assert removing.is_alive(), "the removal decided which blobs to delete while a model using them was added"
    finally:
        resume.set()
        adding.join(60)
        removing.join(60)
    assert deleted == [0]
    assert len(stored(settings, BLOB_PREFIX)) == n_files
    with session_scope(settings.db_url) as session:
        record = get_model(session, model_id=second)
    assert (ModelStore(tmp_path / "another-machine", storage).model_dir(record) / "config.json").exists()
    assert tuneforge(settings, "models", "remove", second).returncode == 0


@pytest.mark.parametrize("backend", ["embedded", "production"], indirect=True)
def test_a_model_add_that_is_not_committed_leaves_no_blob(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = build_tiny_model("llama", tmp_path / "model", seed=random.randrange(1 << 30))  # bytes of its own

    def cache_full(self: ModelStore, record: Any, stage: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ModelStore, "adopt", cache_full)
    with pytest.raises(OSError), session_scope(settings.db_url) as session:
        register_model(
            session,
            store=ModelStore(tmp_path / "cache", ObjectStorage.from_settings(settings)),
            storage=ObjectStorage.from_settings(settings),
            scratch_dir=tmp_path / "scratch",
            model_id=f"tiny-failed-{uuid.uuid4().hex[:6]}",
            source="path",
            location=str(folder),
        )
    # Its weights are its own and gone; on PostgreSQL, other tests' tiny models of the same architecture, registered
    # in the shared database at any moment, may use its config and tokenizer files, so only on the embedded backend
    # is the store then empty.
    weights = {hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.glob("*.safetensors")}
    assert weights and not {key.rsplit("/", 1)[-1] for key in stored(settings, BLOB_PREFIX)} & weights
    if settings.db_url.startswith("sqlite"):
        assert stored(settings, BLOB_PREFIX) == []
    assert "tiny-failed" not in tuneforge(settings, "models", "list", "--local", "--json").stdout
