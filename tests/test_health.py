"""Liveness and readiness: `/readyz` names the dependency that does not answer, `/healthz` does not care."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.core.settings import Settings
from app.main import create_app
from tests.conftest import S3_BUCKET, S3_KEY, embedded_settings, free_port

# /readyz bounds itself at about 4 s; the margin is for a slow test machine.
ANSWER_BOUND_S = 8.0


def get_timed(settings: Settings, path: str) -> tuple[Any, float]:
    with TestClient(create_app(settings)) as client:
        start = time.monotonic()
        response = client.get(path)
        return response, time.monotonic() - start


def s3_at(port: int) -> dict[str, Any]:
    return {
        "storage_url": f"s3://{S3_BUCKET}/readiness",
        "s3_endpoint_url": f"http://127.0.0.1:{port}",
        "s3_access_key_id": S3_KEY,
        "s3_secret_access_key": S3_KEY,
    }


def assert_only_failed(body: dict[str, Any], failed: str, message: str) -> None:
    assert body["status"] == "not_ready"
    assert set(body["checks"]) == {"database", "broker", "object_store"}
    for name, check in body["checks"].items():
        if name == failed:
            assert check["ok"] is False, body
            assert check["message"] == message, body
        else:
            assert check["ok"] is True, body


def test_ready_when_every_dependency_answers(settings: Settings) -> None:
    response, _ = get_timed(settings, "/readyz")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready"
    assert set(body["checks"]) == {"database", "broker", "object_store"}
    for check in body["checks"].values():
        assert check["ok"] is True
        assert check["latency_ms"] >= 0
        assert "message" not in check


def test_broker_down_is_not_ready_and_names_only_the_broker(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    down = settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{port}/0"})
    with caplog.at_level(logging.WARNING, logger="app.core.readiness"):
        response, took = get_timed(down, "/readyz")
    assert response.status_code == 503, response.text
    assert_only_failed(response.json(), "broker", "unreachable")
    assert took < ANSWER_BOUND_S
    # The operator reads the details in the server log; the client never sees where the broker is.
    assert str(port) not in response.text and "127.0.0.1" not in response.text and "redis" not in response.text
    assert str(port) in caplog.text


def test_object_store_down_is_not_ready(settings: Settings) -> None:
    port = free_port()
    response, took = get_timed(settings.model_copy(update=s3_at(port)), "/readyz")
    assert response.status_code == 503, response.text
    assert_only_failed(response.json(), "object_store", "unreachable")
    assert took < ANSWER_BOUND_S
    assert str(port) not in response.text and S3_BUCKET not in response.text


def test_database_down_is_not_ready_but_alive(settings: Settings) -> None:
    port = free_port()
    down = settings.model_copy(update={"database_url": f"postgresql+psycopg://postgres@127.0.0.1:{port}/tuneforge"})
    response, took = get_timed(down, "/readyz")
    assert response.status_code == 503, response.text
    assert_only_failed(response.json(), "database", "unreachable")
    assert took < ANSWER_BOUND_S
    assert str(port) not in response.text

    liveness, _ = get_timed(down, "/healthz")
    assert liveness.status_code == 200
    assert liveness.json() == {"status": "ok"}


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog does) and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield int(server.getsockname()[1])


@pytest.mark.slow  # waits out the timeouts it checks
def test_hanging_dependencies_time_out_within_the_bound(
    tmp_path: Path, model_cache_dir: Path, silent_port: int
) -> None:
    settings = embedded_settings(
        tmp_path / "data",
        model_cache_dir,
        database_url=f"postgresql+psycopg://postgres@127.0.0.1:{silent_port}/tuneforge",
        broker_url=f"redis://127.0.0.1:{silent_port}/0",
        **s3_at(silent_port),
    )
    response, took = get_timed(settings, "/readyz")
    assert took < ANSWER_BOUND_S
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["status"] == "not_ready"
    assert {name: check["message"] for name, check in body["checks"].items()} == {
        "database": "timed out",
        "broker": "timed out",
        "object_store": "timed out",
    }


def test_openapi_describes_both_probes(tmp_path: Path, model_cache_dir: Path) -> None:
    with TestClient(create_app(embedded_settings(tmp_path / "data", model_cache_dir))) as client:
        paths = client.get("/openapi.json").json()["paths"]
    readyz = paths["/readyz"]["get"]["responses"]
    for status in ("200", "503"):
        assert readyz[status]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Readiness"}
    assert paths["/healthz"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Liveness"
    }
    assert "security" not in paths["/readyz"]["get"] and "security" not in paths["/healthz"]["get"]


def test_a_flood_of_probes_runs_the_checks_once_a_second(
    tmp_path: Path, model_cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/readyz needs no key: concurrent probes share one round of checks instead of each opening connections."""
    import threading

    import app.core.readiness as readiness

    rounds = 0
    real = readiness.check_readiness

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal rounds
        rounds += 1
        time.sleep(0.3)  # a slow dependency: the other probes arrive while this round runs
        return real(*args, **kwargs)

    monkeypatch.setattr(readiness, "check_readiness", counted)
    with TestClient(create_app(embedded_settings(tmp_path / "data", model_cache_dir))) as client:
        statuses: list[int] = []
        threads = [
            threading.Thread(target=lambda: statuses.append(client.get("/readyz").status_code)) for _ in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert statuses == [200] * 8
        assert rounds == 1
        time.sleep(1.1)
        assert client.get("/readyz").status_code == 200
        assert rounds == 2
