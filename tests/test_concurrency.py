"""Check-then-write under concurrent requests, on both backends: the active jobs limit, the storage quota, a file
deleted and a model removed while a job is created on it hold on SQLite (the embedded default) as PostgreSQL's row
locks make them hold there. Each test widens the window between the check and the write (a pause where a slow
machine could pause), so that requests which did not wait for each other would all pass the check."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.core.settings import Settings
from app.files import service as files_service
from app.jobs import planning, state
from app.main import create_app
from tests.conftest import Tenant, chat_lines, jsonl, upload


def at_once(*calls: Callable[[], Any], stagger: float = 0.0) -> list[Any]:
    """Run the calls in threads started together (each `stagger` seconds after the one before); their results."""
    results: list[Any] = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(i: int) -> None:
        start.wait()
        time.sleep(i * stagger)
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def paused_after(function: Callable[..., Any], seconds: float) -> Callable[..., Any]:
    def paused(*args: Any, **kwargs: Any) -> Any:
        result = function(*args, **kwargs)
        time.sleep(seconds)
        return result

    return paused


def test_the_active_jobs_limit_holds_under_concurrent_requests(
    settings: Settings, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    with TestClient(create_app(settings.model_copy(update={"max_active_jobs_per_tenant": 1}))) as client:
        file_id = upload(client, tenant, jsonl(chat_lines(8))).json()["id"]
        monkeypatch.setattr(state, "create", paused_after(state.create, 0.3))  # between the count and the commit

        def create() -> int:
            return client.post("/jobs", headers=tenant.headers, json={"training_file": file_id}).status_code

        statuses = at_once(*[create] * 4)
        assert sorted(statuses) == [201, 429, 429, 429]
        assert len(client.get("/jobs", headers=tenant.headers).json()["data"]) == 1


def test_the_storage_quota_holds_under_concurrent_uploads(
    settings: Settings, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    content = jsonl(chat_lines(8))
    quota = len(content) * 3 // 2  # room for one file, not two
    with TestClient(create_app(settings.model_copy(update={"max_stored_bytes_per_tenant": quota}))) as client:
        upload(client, tenant, jsonl(chat_lines(1))).raise_for_status()  # the tokenizer is loaded
        client.delete(
            f"/v1/files/{client.get('/v1/files', headers=tenant.headers).json()['data'][0]['id']}",
            headers=tenant.headers,
        ).raise_for_status()
        monkeypatch.setattr(files_service, "check_storage", paused_after(files_service.check_storage, 0.3))
        statuses = at_once(*[lambda: upload(client, tenant, content).status_code] * 3)
        assert sorted(statuses) == [201, 403, 403]
        assert len(client.get("/v1/files", headers=tenant.headers).json()["data"]) == 1


def test_a_file_deleted_while_a_job_is_created_on_it_is_one_or_the_other(
    settings: Settings, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    with TestClient(create_app(settings)) as client:
        file_id = upload(client, tenant, jsonl(chat_lines(8))).json()["id"]
        # The job's checks hold the file from here (after they found it) until the job is committed.
        monkeypatch.setattr(planning, "token_counts", paused_after(planning.token_counts, 1.5))
        created, deleted = at_once(
            lambda: client.post("/jobs", headers=tenant.headers, json={"training_file": file_id}),
            lambda: client.delete(f"/v1/files/{file_id}", headers=tenant.headers),
            stagger=1.0,  # the job's checks hold the file by then
        )
    # One or the other, never both: the job first (the deletion refused), or, on a slow machine, the deletion first
    # (the job refused: no such file).
    if created.status_code == 201:
        assert deleted.status_code == 409 and deleted.json()["error"]["code"] == "file_in_use", deleted.text
    else:
        assert created.status_code == 422 and deleted.status_code == 200, (created.text, deleted.text)


def test_a_model_removed_while_a_job_is_created_on_it_is_one_or_the_other(
    settings: Settings, tenant: Tenant, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tests.test_base_models import build_tiny_model, register, tuneforge, upload_for

    register(settings, "tiny-a", "--path", build_tiny_model("llama", tmp_path / "model"))
    with TestClient(create_app(settings)) as client:
        file_id = upload_for(client, tenant, jsonl(chat_lines(4)), base_model="tiny-a").json()["id"]
        # The job's checks hold the model from here (after they found it) until the job is committed.
        monkeypatch.setattr(planning, "token_counts", paused_after(planning.token_counts, 1.5))
        created, removed = at_once(
            lambda: client.post(
                "/jobs", headers=tenant.headers, json={"training_file": file_id, "base_model": "tiny-a"}
            ),
            lambda: tuneforge(settings, "models", "remove", "tiny-a"),
            stagger=1.0,  # the job's checks hold the model by then
        )
        # One or the other, never both (a job on a model that is gone).
        if created.status_code == 201:
            assert removed.returncode == 1 and "is used by job" in removed.stderr, removed.stdout
            assert client.get("/v1/models/tiny-a", headers=tenant.headers).status_code == 200
        else:
            assert created.json()["error"]["code"] == "model_not_found" and removed.returncode == 0, created.text
