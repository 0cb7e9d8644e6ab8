"""`Idempotency-Key` on POST /v1/files and POST /jobs: a retried request returns the original, never a duplicate."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import update

from app.core.db import session_scope
from app.core.models import IdempotencyKey, utcnow
from app.core.settings import Settings
from tests.conftest import Tenant, chat_lines, jsonl, upload
from tests.test_jobs import queued_messages


def post_job(client: TestClient, tenant: Tenant, key: str, **body: Any) -> Any:
    headers = {**tenant.headers, "Idempotency-Key": key}
    return client.post("/jobs", headers=headers, json={"base_model": "tiny-random-llama", **body})


def listed(client: TestClient, tenant: Tenant, path: str) -> int:
    """How many jobs or files the tenant sees."""
    return len(client.get(f"{path}?limit=100", headers=tenant.headers).json()["data"])


def test_a_retried_job_request_returns_the_first_job(client: TestClient, tenant: Tenant, settings: Settings) -> None:
    file_id = upload(client, tenant, jsonl(chat_lines(8))).json()["id"]
    first = post_job(client, tenant, "retry-1", training_file=file_id)
    again = post_job(client, tenant, "retry-1", training_file=file_id)
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"]
    assert listed(client, tenant, "/jobs") == 1 and len(queued_messages(settings)) == 1  # one job, sent once

    reused = post_job(client, tenant, "retry-1", training_file=file_id, suffix="other")
    assert reused.status_code == 409 and reused.json()["error"]["code"] == "idempotency_key_reused"
    assert post_job(client, tenant, "retry-2", training_file=file_id).json()["id"] != first.json()["id"]


def test_keys_belong_to_a_tenant_and_expire(
    client: TestClient, tenant: Tenant, make_tenant: Any, settings: Settings
) -> None:
    other = make_tenant()
    mine = upload(client, tenant, jsonl(chat_lines(8))).json()["id"]
    theirs = upload(client, other, jsonl(chat_lines(8))).json()["id"]
    a = post_job(client, tenant, "same", training_file=mine).json()["id"]
    b = post_job(client, other, "same", training_file=theirs).json()["id"]
    assert a != b
    with session_scope(settings.db_url) as session:  # a day and a bit later
        session.execute(update(IdempotencyKey).values(created_at=utcnow() - timedelta(hours=25)))
    assert post_job(client, tenant, "same", training_file=mine).json()["id"] not in (a, b)


def test_a_retried_upload_returns_the_first_file_without_reading_the_body(
    client: TestClient, tenant: Tenant, settings: Settings
) -> None:
    headers = {**tenant.headers, "Idempotency-Key": "upload-1"}
    files = {"file": ("train.jsonl", jsonl(chat_lines(8)))}
    first = client.post("/v1/files", headers=headers, files=files, data={"purpose": "fine-tune"})
    assert first.status_code == 201
    bad = {"file": ("train.jsonl", b"not json\n")}  # would be a 422 if it were read
    again = client.post("/v1/files", headers=headers, files=bad, data={"purpose": "fine-tune"})
    assert again.status_code == 201 and again.json() == first.json()
    assert listed(client, tenant, "/v1/files") == 1
    # Once the file is deleted, the key stores a new one.
    client.delete(f"/v1/files/{first.json()['id']}", headers=tenant.headers)
    third = client.post("/v1/files", headers=headers, files=files, data={"purpose": "fine-tune"})
    assert third.status_code == 201 and third.json()["id"] != first.json()["id"]


def test_bad_keys_are_refused(client: TestClient, tenant: Tenant) -> None:
    for key in ("x" * 256, "two words"):
        r = client.post("/jobs", headers={**tenant.headers, "Idempotency-Key": key}, json={"training_file": "f"})
        assert r.status_code == 422 and r.json()["error"]["param"] == "Idempotency-Key", key


def test_concurrent_requests_with_one_key_make_one_job(client: TestClient, tenant: Tenant, settings: Settings) -> None:
    file_id = upload(client, tenant, jsonl(chat_lines(8))).json()["id"]
    answers: list[Any] = []
    start = threading.Barrier(4)

    def send() -> None:
        start.wait()
        answers.append(post_job(client, tenant, "race", training_file=file_id))

    threads = [threading.Thread(target=send) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.status_code for r in answers] == [201] * 4
    assert len({r.json()["id"] for r in answers}) == 1
    assert listed(client, tenant, "/jobs") == 1 and len(queued_messages(settings)) == 1
