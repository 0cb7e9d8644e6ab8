"""One tenant's load stays that tenant's problem: slow uploads hold no database connection, each tenant's uploads,
event streams and generation requests are bounded (429 past the bound), slow clients are cut off, a revoked key
ends its event streams, and the generation engine's waiting line is fair across tenants. Against a real server
(uvicorn on loopback) and raw sockets where a client must misbehave."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.pool import QueuePool

from app.auth.service import revoke_key
from app.core.db import get_engine, session_scope
from app.core.settings import Settings
from app.core.storage import ObjectStorage
from app.jobs import streaming
from app.main import create_app
from app.ml.device import resolve_placement
from app.ml.models import BUILTINS, ModelStore
from app.ml.serving import EngineOverloaded, GenerationEngine, GenerationRequest, OwnerOverloaded
from tests.conftest import Tenant, chat_lines, jsonl, live, serving_limits, tenant_id

BOUNDARY = "tuneforgeboundary"


class SlowUpload:
    """A multipart upload of a valid file whose client sends its body a byte at a time, as slowly as it likes."""

    def __init__(self, url: str, key: str, *, byte_every: float = 0.2) -> None:
        content = jsonl(chat_lines(4))
        self.body = (
            (
                f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="slow.jsonl"\r\n'
                "Content-Type: application/jsonl\r\n\r\n"
            ).encode()
            + content
            + f"\r\n--{BOUNDARY}--\r\n".encode()
        )
        host, port = httpx.URL(url).host, httpx.URL(url).port
        self.sock = socket.create_connection((host, port), timeout=30)
        head = (
            f"POST /v1/files HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(self.body)}\r\n\r\n"
        )
        self.sock.sendall(head.encode())
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._trickle, args=(byte_every,), daemon=True)
        self.thread.start()

    def _trickle(self, byte_every: float) -> None:
        for i in range(len(self.body) - 1):  # never the last byte: the request never completes by itself
            if self.stopped.wait(byte_every):
                return
            try:
                self.sock.sendall(self.body[i : i + 1])
            except OSError:
                return  # the server answered and closed

    def status(self, timeout: float) -> int:
        """The status the server answered with (it may answer before the body is complete)."""
        self.sock.settimeout(timeout)
        line = self.sock.recv(64).split(b"\r\n", 1)[0]
        return int(line.split()[1])

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
        self.sock.close()


@contextmanager
def slow_uploads(url: str, key: str, n: int, **kwargs: Any) -> Iterator[list[SlowUpload]]:
    started = [SlowUpload(url, key, **kwargs) for _ in range(n)]
    try:
        yield started
    finally:
        for s in started:
            s.close()


@contextmanager
def served(settings: Settings, **changes: Any) -> Iterator[tuple[str, Any]]:
    app = create_app(settings.model_copy(update=changes))
    with live(app) as url:
        yield url, app


def test_slow_uploads_hold_no_database_connection(settings: Settings, tenant: Tenant, make_tenant: Any) -> None:
    """16 uploads trickling a byte at a time (more than the connection pool's 5 + 10): another tenant's reads
    answer at once, as they did with none."""
    other = make_tenant()
    with served(settings, max_uploads_per_tenant=32) as (url, app), slow_uploads(url, tenant.key, 16) as uploads:
        deadline = time.monotonic() + 10
        while app.state.uploads.held(tenant_id(settings, tenant)) < 16:  # every upload is past its pre-checks
            assert time.monotonic() < deadline, "the slow uploads did not all start"
            time.sleep(0.05)
        for _ in range(3):
            started = time.monotonic()
            r = httpx.get(f"{url}/jobs", headers=other.headers, timeout=30)
            assert r.status_code == 200, r.text
            assert time.monotonic() - started < 2.0
        assert httpx.get(f"{url}/readyz", timeout=30).status_code == 200
        assert len(uploads) == 16


def test_a_tenant_past_its_uploads_in_progress_gets_429(settings: Settings, tenant: Tenant, make_tenant: Any) -> None:
    other = make_tenant()
    with served(settings, max_uploads_per_tenant=2) as (url, app):
        with slow_uploads(url, tenant.key, 2):
            deadline = time.monotonic() + 10
            while app.state.uploads.held(tenant_id(settings, tenant)) < 2:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            r = httpx.post(f"{url}/v1/files", headers=tenant.headers, files={"file": ("t.jsonl", jsonl(chat_lines(2)))})
            assert r.status_code == 429, r.text
            assert r.json()["error"]["code"] == "too_many_uploads" and r.headers["Retry-After"] == "5"
            assert "TUNEFORGE_MAX_UPLOADS_PER_TENANT" in r.json()["error"]["message"]
            r = httpx.post(
                f"{url}/v1/files", headers=other.headers, files={"file": ("t.jsonl", jsonl(chat_lines(2)))}, timeout=60
            )  # the first upload in the process loads the tokenizer: up to 15 s on a busy machine
            assert r.status_code == 201, r.text  # another tenant uploads as usual
        deadline = time.monotonic() + 10  # the slow clients went away: their slots are free again
        while app.state.uploads.held(tenant_id(settings, tenant)):
            assert time.monotonic() < deadline, "the abandoned uploads kept their slots"
            time.sleep(0.05)
        r = httpx.post(
            f"{url}/v1/files", headers=tenant.headers, files={"file": ("t.jsonl", jsonl(chat_lines(2)))}, timeout=60
        )
        assert r.status_code == 201, r.text


def test_an_upload_slower_than_the_minimum_rate_is_cut_off(settings: Settings, tenant: Tenant) -> None:
    storage = ObjectStorage.from_settings(settings)
    before = storage.list_keys()
    with served(settings, upload_grace_seconds=1.0, upload_min_bytes_per_second=1000) as (url, app):
        started = time.monotonic()
        with slow_uploads(url, tenant.key, 1, byte_every=0.05) as (slow,):
            assert slow.status(timeout=20) == 408
        assert time.monotonic() - started < 10
        assert app.state.uploads.held(tenant_id(settings, tenant)) == 0
        # A client that keeps up is not cut off, whatever the file's size.
        r = httpx.post(
            f"{url}/v1/files", headers=tenant.headers, files={"file": ("t.jsonl", jsonl(chat_lines(200)))}, timeout=60
        )
        assert r.status_code == 201, r.text
    assert len(storage.list_keys()) == len(before) + 1


# One backend: the mapping is the same code on both, and the PostgreSQL test server is shared with the other test
# processes, whose connections made the production case flaky under load.
@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_a_full_connection_pool_is_a_503_with_retry_after(
    settings: Settings, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = get_engine(settings.db_url)
    with served(settings) as (url, _):
        assert httpx.get(f"{url}/jobs", headers=tenant.headers).status_code == 200
        # A pool of one connection, which this test holds (not the service's 5 + 10: the test database server may
        # not have that many connections to spare while other tests run).
        small = QueuePool(engine.pool._creator, pool_size=1, max_overflow=0, timeout=0.5)  # type: ignore[attr-defined]
        monkeypatch.setattr(engine, "pool", small)
        held = engine.connect()
        try:
            r = httpx.get(f"{url}/jobs", headers=tenant.headers, timeout=30)
        finally:
            held.close()
            small.dispose()
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "database_unavailable" and r.headers["Retry-After"]


def open_stream(url: str, tenant: Tenant, job_id: str) -> Any:
    return httpx.stream(
        "GET", f"{url}/jobs/{job_id}/events", params={"stream": "true"}, headers=tenant.headers, timeout=30
    )


def test_a_tenant_past_its_open_event_streams_gets_429(settings: Settings, tenant: Tenant, make_tenant: Any) -> None:
    with served(settings, max_event_streams_per_tenant=2) as (url, app):
        job_id = queued_job(url, tenant)
        with open_stream(url, tenant, job_id) as first, open_stream(url, tenant, job_id) as second:
            assert first.status_code == second.status_code == 200
            r = httpx.get(f"{url}/jobs/{job_id}/events", params={"stream": "true"}, headers=tenant.headers)
            assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_streams"
            assert r.headers["Retry-After"]
            # Listing the events (not streaming) is not a stream.
            assert httpx.get(f"{url}/jobs/{job_id}/events", headers=tenant.headers).status_code == 200
        deadline = time.monotonic() + 10  # the clients went away: the streams end and free their slots
        while app.state.streams.held(tenant_id(settings, tenant)):
            assert time.monotonic() < deadline, "closed streams kept their slots"
            time.sleep(0.05)
        with open_stream(url, tenant, job_id) as again:
            assert again.status_code == 200


def test_an_event_stream_ends_when_its_key_is_revoked(
    settings: Settings, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streaming, "KEY_CHECK_SECONDS", 0.3)
    with session_scope(settings.db_url) as session:  # a second key of the same tenant, to revoke
        from app.auth.service import create_api_key

        second = Tenant(tenant.name, create_api_key(session, tenant_name=tenant.name))
    with served(settings) as (url, _):
        job_id = queued_job(url, tenant)
        with open_stream(url, second, job_id) as stream, open_stream(url, tenant, job_id) as kept:
            assert stream.status_code == kept.status_code == 200
            lines = stream.iter_lines()
            next(lines)  # the stream has begun (its retry line)
            with session_scope(settings.db_url) as session:
                revoke_key(session, prefix=second.key[:12])
            started = time.monotonic()
            for _ in lines:  # ends by itself once the revocation is seen
                assert time.monotonic() - started < 10
            assert time.monotonic() - started < 5
            # The tenant's other key's stream goes on.
            assert not kept.is_closed
        r = httpx.get(f"{url}/jobs/{job_id}/events", params={"stream": "true"}, headers=second.headers)
        assert r.status_code == 401  # a reconnection is authenticated again


def queued_job(url: str, tenant: Tenant) -> str:
    """A job that stays queued (no worker runs here): its event stream stays open."""
    r = httpx.post(
        f"{url}/v1/files", headers=tenant.headers, files={"file": ("t.jsonl", jsonl(chat_lines(4)))}, timeout=60
    )
    assert r.status_code == 201, r.text
    r = httpx.post(
        f"{url}/jobs",
        headers=tenant.headers,
        json={"training_file": r.json()["id"], "method": "lora", "base_model": "tiny-random-llama"},
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


# --- the generation engine's waiting line ------------------------------------------------------------------------
TINY = BUILTINS["tiny-random-llama"]


@pytest.fixture
def engine(model_cache_dir: Path, tmp_path: Path) -> Iterator[Any]:
    made: list[GenerationEngine] = []

    def make(**limits: Any) -> GenerationEngine:
        made.append(
            GenerationEngine(
                models=ModelStore(model_cache_dir, None),
                placement=resolve_placement("cpu", "float32"),
                storage=ObjectStorage.from_settings(Settings(data_dir=tmp_path / "data")),
                cache_dir=tmp_path / "adapter-cache",
                limits=serving_limits(**limits),
            )
        )
        return made[-1]

    yield make
    for e in made:
        e.close()


def request(owner: str, max_tokens: int) -> GenerationRequest:
    return GenerationRequest(model=TINY, input_ids=[1, 5, 9], max_tokens=max_tokens, ignore_eos=True, owner=owner)


def test_one_tenants_many_requests_do_not_hold_back_anothers_first(engine: Any) -> None:
    e = engine(max_batch=8, max_waiting=256)
    e.generate(request("warm-up", 1))  # the model is loaded
    busy = [e.submit(request("a", 200)) for _ in range(100)]
    deadline = time.monotonic() + 30
    while e.stats()["running"] < 7:  # a's requests fill the batch, but for the rows kept for others
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert e.stats()["running"] == 7
    submitted_at = e.steps
    first: list[int] = []
    other = e.submit(request("b", 3), on_delta=lambda _: first.append(e.steps))
    assert other.result(timeout=60).completion_tokens == 3
    assert first[0] - submitted_at <= 2, f"b's first token came {first[0] - submitted_at} steps after it was sent"
    assert not any(g.future.done() for g in busy[10:])  # a's later requests were still waiting
    for g in busy:
        g.cancel()


def test_the_waiting_line_takes_each_tenants_oldest_request_first(engine: Any) -> None:
    e = engine(max_batch=2, max_waiting=256)  # too small a batch to keep rows for others: the order alone decides
    e.generate(request("warm-up", 1))
    started: list[str] = []  # whose request gave its first token, in order

    def first_token(name: str) -> Any:
        def on_delta(_: Any) -> None:
            if name not in started:
                started.append(name)

        return on_delta

    a = [e.submit(request("a", 20), on_delta=first_token(f"a{i}")) for i in range(10)]
    deadline = time.monotonic() + 30
    while len(started) < 2:  # a's first two fill the batch; the other eight wait
        assert time.monotonic() < deadline
        time.sleep(0.005)
    b = e.submit(request("b", 3), on_delta=first_token("b"))
    assert b.result(timeout=60).completion_tokens == 3
    assert started.index("b") <= 3, f"b started after {started.index('b')} of a's requests: {started}"
    for g in a:
        g.cancel()


def test_each_tenant_is_bounded_and_a_full_line_still_takes_a_new_tenants_first(engine: Any) -> None:
    e = engine(max_batch=1, max_waiting=3, max_per_owner=3)
    e.generate(request("warm-up", 1))
    held = [e.submit(request("a", 500)) for _ in range(3)]
    with pytest.raises(OwnerOverloaded):
        e.submit(request("a", 1))
    more = [e.submit(request("b", 1)), e.submit(request("c", 1))]  # the line is full now (a's 2 + b + c)
    with pytest.raises(EngineOverloaded):
        e.submit(request("b", 1))  # b has one in the engine already
    more.append(e.submit(request("d", 1)))  # d has none: its first always gets in
    for g in held:
        g.cancel()
    assert [g.result(timeout=60).completion_tokens for g in more] == [1, 1, 1]
    assert e.scheduler.owned("a") == 0  # a's cancelled requests freed their places


def test_a_tenant_past_its_generation_requests_gets_429(
    settings: Settings, tenant: Tenant, make_tenant: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = make_tenant()
    # Greedy decoding of this prompt does not reach the end-of-sequence token within 1900 tokens.
    body = {"base_model": "tiny-random-llama", "prompt": "The secret word is", "temperature": 0}
    with served(settings, serving_max_requests_per_tenant=1) as (url, app):
        r = httpx.post(f"{url}/generate", headers=tenant.headers, json={**body, "max_tokens": 1}, timeout=60)
        assert r.status_code == 200
        runner = app.state.engine.runner
        step = runner.step

        def slow_step(*args: Any) -> None:  # so that the long request below is still running when it is checked
            time.sleep(0.01)
            step(*args)

        monkeypatch.setattr(runner, "step", slow_step)
        with httpx.stream(
            "POST", f"{url}/generate", headers=tenant.headers, json={**body, "max_tokens": 1900, "stream": True}
        ) as long:
            lines = long.iter_lines()  # kept: an iterator dropped closes the response, and the server cancels it
            next(lines)
            r = httpx.post(f"{url}/generate", headers=tenant.headers, json={**body, "max_tokens": 1})
            assert r.status_code == 429, r.text
            assert r.json()["error"]["code"] == "too_many_generations" and r.headers["Retry-After"]
            r = httpx.post(f"{url}/generate", headers=other.headers, json={**body, "max_tokens": 1}, timeout=60)
            assert r.status_code == 200, r.text


def test_counting_a_files_tokens_for_a_job_holds_no_database_connection(
    settings: Settings, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job on a file whose tokens were not counted with its model's tokenizer reads the whole file again: no
    connection is checked out of the pool meanwhile."""
    from fastapi.testclient import TestClient

    from app.core.models import FileTokenCount
    from app.files import service as files_service

    pool = get_engine(settings.db_url).pool
    scan = files_service._scan
    checked_out: list[int] = []

    def watched_scan(*args: Any, **kwargs: Any) -> Any:
        checked_out.append(pool.checkedout())
        return scan(*args, **kwargs)

    with TestClient(create_app(settings)) as client:
        r = client.post("/v1/files", headers=tenant.headers, files={"file": ("t.jsonl", jsonl(chat_lines(4)))})
        file_id = r.json()["id"]
        with session_scope(settings.db_url) as session:  # as if it had been counted with another tokenizer
            session.query(FileTokenCount).filter_by(file_id=file_id).delete()
        monkeypatch.setattr(files_service, "_scan", watched_scan)
        for dry_run in (True, False):
            body = {"training_file": file_id, "method": "lora", "base_model": "tiny-random-llama", "dry_run": dry_run}
            assert client.post("/jobs", headers=tenant.headers, json=body).status_code in (200, 201)
            if dry_run:
                with session_scope(settings.db_url) as session:
                    session.query(FileTokenCount).filter_by(file_id=file_id).delete()
    assert checked_out == [0, 0]


def test_sizing_what_a_job_will_store_holds_no_database_connection(
    settings: Settings, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POST /jobs reserves what the job will store, estimated on a model built on the meta device (a second or
    more on a large model): no connection is checked out of the pool meanwhile, and the estimate is made once."""
    from collections import OrderedDict

    from fastapi.testclient import TestClient

    from app.ml import footprint

    pool = get_engine(settings.db_url).pool
    estimate = footprint.estimate
    checked_out: list[int] = []

    def watched_estimate(*args: Any, **kwargs: Any) -> Any:
        checked_out.append(pool.checkedout())
        return estimate(*args, **kwargs)

    monkeypatch.setattr(footprint, "_estimates", OrderedDict())  # none made yet in this process
    monkeypatch.setattr(footprint, "estimate", watched_estimate)
    with TestClient(create_app(settings)) as client:
        r = client.post("/v1/files", headers=tenant.headers, files={"file": ("t.jsonl", jsonl(chat_lines(4)))})
        body = {"training_file": r.json()["id"], "base_model": "tiny-random-llama", "hyperparameters": {"lora_r": 4}}
        plan = client.post("/jobs", headers=tenant.headers, json={**body, "dry_run": True})
        assert plan.status_code == 200, plan.text
        created = client.post("/jobs", headers=tenant.headers, json=body)
        assert created.status_code == 201, created.text
        assert created.json()["reserved_bytes"] == plan.json()["estimated_stored_bytes"] > 0
    assert checked_out == [0]
