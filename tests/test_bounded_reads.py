"""Reads of tables that grow without bound stay bounded: a long job's curves are thinned by the database, its
metric events are down-sampled past a bound as they are written, and expired idempotency keys are swept."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import insert, select, update
from sqlalchemy.engine import cursor as sqlalchemy_cursor

from app.core.db import session_scope
from app.core.models import IdempotencyKey, Job, JobEvent, utcnow
from app.core.models import Tenant as TenantRow
from app.core.settings import Settings
from app.jobs import events as job_events
from app.jobs.reaper import Reaper
from tests.conftest import Tenant, chat_lines, jsonl, upload
from tests.test_worker import events, start_job
from worker import lifecycle


@contextlib.contextmanager
def rows_fetched() -> Iterator[list[int]]:
    """How many rows SQLAlchemy fetches from the database driver while the block runs (every statement, any
    backend): `[n]`."""
    counted = [0]
    patched = []
    for strategy in (sqlalchemy_cursor.CursorFetchStrategy, sqlalchemy_cursor.BufferedRowCursorFetchStrategy):
        for name in ("fetchone", "fetchmany", "fetchall"):
            original = strategy.__dict__[name]

            def counting(self: Any, *args: Any, _original: Any = original, _name: str = name) -> Any:
                result = _original(self, *args)
                if _name == "fetchone":
                    counted[0] += result is not None
                else:
                    counted[0] += len(result)
                return result

            setattr(strategy, name, counting)
            patched.append((strategy, name, original))
    try:
        yield counted
    finally:
        for strategy, name, original in patched:
            setattr(strategy, name, original)


def test_a_long_jobs_curves_are_thinned_in_the_database(client: TestClient, tenant: Tenant, settings: Settings) -> None:
    job_id = start_job(client, tenant)  # queued: its events are written here, as 5000 steps would have them
    n_steps, every_eval = 5000, 50
    with session_scope(settings.db_url) as session:
        last = session.scalar(select(Job.last_event_seq).where(Job.id == job_id)) or 0
        rows: list[dict[str, Any]] = []
        for step in range(1, n_steps + 1):
            data = {"step": step, "epoch": 1, "train_loss": 1 / step, "learning_rate": 0.001}
            rows.append({"job_id": job_id, "seq": last + len(rows) + 1, "type": "metrics", "data": data})
            if step % every_eval == 0:
                evaluation = {"step": step, "epoch": 1, "valid_loss": 2 / step}
                rows.append({"job_id": job_id, "seq": last + len(rows) + 1, "type": "eval", "data": evaluation})
        session.execute(insert(JobEvent), rows)
        session.execute(update(Job).where(Job.id == job_id).values(last_event_seq=last + len(rows)))

    with rows_fetched() as fetched:
        r = client.get(f"/jobs/{job_id}/metrics?max_points=100", headers=tenant.headers)
    assert r.status_code == 200, r.text
    assert fetched[0] < 300, fetched  # the two curves' 200 points, the job and the key: not 5100 events
    curves = r.json()["curves"]
    train = [step for step, _ in curves["train_loss"]]
    assert len(train) <= 100 and train[0] == 1 and train[-1] == n_steps
    strides = {b - a for a, b in zip(train[:-1], train[1:-1], strict=False)}
    assert strides == {n_steps // 99 + 1}  # every k-th step, then the last
    assert curves["train_loss"][-1] == [n_steps, 1 / n_steps]
    valid = [step for step, _ in curves["valid_loss"]]
    assert len(valid) <= 100 and valid[0] == every_eval and valid[-1] == n_steps
    assert set(curves) == {"train_loss", "learning_rate", "valid_loss"}

    everything = client.get(f"/jobs/{job_id}/metrics?max_points=10000", headers=tenant.headers).json()["curves"]
    assert len(everything["valid_loss"]) == n_steps // every_eval  # under the bound: every point


def test_metric_events_of_a_long_job_are_down_sampled_as_they_are_written(
    client: TestClient, tenant: Tenant, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(job_events, "METRIC_STEPS_IN_FULL", 8)  # the bound, small (10,000 steps by default)
    job_id = start_job(client, tenant)
    claimed = lifecycle.claim(settings, job_id)
    assert claimed is not None
    reporter = lifecycle.JobReporter(settings.db_url, claimed)
    total = 50
    for step in range(1, total + 1):
        reporter.progress(
            step=step, total_steps=total, epoch=1, metrics={"train_loss": 1 / step}, message=f"step {step}"
        )
        if step == 30:
            reporter.progress(
                step=step, total_steps=total, epoch=1, metrics={"valid_loss": 0.5}, message="eval", type_="eval"
            )
    written = events(client, tenant, job_id)
    metric_steps = [e["data"]["step"] for e in written if e["type"] == "metrics"]
    # Every step up to the bound, then every 2nd up to twice it, every 4th up to 4 times, …, and the last.
    assert metric_steps == [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 50]
    assert [e["data"]["step"] for e in written if e["type"] == "eval"] == [30]
    job = client.get(f"/jobs/{job_id}", headers=tenant.headers).json()
    assert job["progress"]["step"] == total and job["metrics"]["train_loss"] == 1 / total  # the row: every step
    curve = client.get(f"/jobs/{job_id}/metrics", headers=tenant.headers).json()["curves"]["train_loss"]
    assert [step for step, _ in curve] == metric_steps
    assert job_events.keeps_metrics_event(9, None) is False


def test_expired_idempotency_keys_are_swept_by_the_reaper(
    client: TestClient, tenant: Tenant, settings: Settings
) -> None:
    for key in ("old-1", "old-2", "fresh"):
        headers = {**tenant.headers, "Idempotency-Key": key}
        r = client.post("/v1/files", headers=headers, files={"file": ("t.jsonl", jsonl(chat_lines(2)))})
        assert r.status_code == 201
    with session_scope(settings.db_url) as session:
        tenant_id = session.scalars(select(TenantRow.id).where(TenantRow.name == tenant.name)).one()
        session.execute(
            update(IdempotencyKey)
            .where(IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key.in_(["old-1", "old-2"]))
            .values(created_at=utcnow() - timedelta(hours=25))
        )

    def keys() -> list[str]:
        with session_scope(settings.db_url) as session:
            query = select(IdempotencyKey.key).where(IdempotencyKey.tenant_id == tenant_id)
            return sorted(session.scalars(query))

    assert keys() == ["fresh", "old-1", "old-2"]
    # No job is ever stale for this reaper: the tests share one PostgreSQL database.
    with Reaper(settings.model_copy(update={"reaper_seconds": 0.1, "heartbeat_timeout_seconds": 1e9})):
        deadline = time.monotonic() + 10
        while keys() != ["fresh"]:
            assert time.monotonic() < deadline, keys()
            time.sleep(0.1)
    again = upload(client, tenant, jsonl(chat_lines(2)))
    assert again.status_code == 201
