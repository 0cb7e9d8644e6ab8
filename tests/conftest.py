"""Fixtures: real PostgreSQL, Redis and an S3 endpoint on loopback (moto), and the embedded SQLite/folder path.

Every test that talks to the API runs against both backends (`backend` is parametrized). Tests are
isolated by tenant: each one creates its own, and a tenant never sees another's data.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from fastapi.testclient import TestClient

from app.auth.service import create_api_key
from app.core.db import migrate, session_scope
from app.core.settings import Settings
from app.main import create_app

PG_ADMIN_DSN = os.environ.get("TUNEFORGE_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TUNEFORGE_TEST_REDIS", "redis://127.0.0.1:6379/11")
S3_BUCKET = "tuneforge-test"
S3_KEY = "testing"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Converted base models, shared by every test and every process the tests start."""
    configured = os.environ.get("TUNEFORGE_TEST_MODEL_CACHE")
    return Path(configured) if configured else tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    name = f"tuneforge_test_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    url = f"{base}/{name}"
    migrate(url)
    yield url
    from app.core.db import get_engine

    get_engine(url).dispose()
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_url() -> str:
    redis.Redis.from_url(REDIS_URL).flushdb()
    return REDIS_URL


@dataclass
class S3Endpoint:
    url: str

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.url, aws_access_key_id=S3_KEY, aws_secret_access_key=S3_KEY, region_name="us-east-1"
        )

    def keys(self, prefix: str = "") -> list[str]:
        response = self.client().list_objects_v2(Bucket=S3_BUCKET, Prefix=prefix)
        return [item["Key"] for item in response.get("Contents", [])]


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Endpoint]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = S3Endpoint(f"http://127.0.0.1:{port}")
    endpoint.client().create_bucket(Bucket=S3_BUCKET)
    yield endpoint
    server.stop()


# The tests share one PostgreSQL database: a reaper in one test's API must not take another test's jobs.
NO_REAPER = {"reaper_seconds": 0}


def embedded_settings(data_dir: Path, model_cache_dir: Path, **overrides: Any) -> Settings:
    overrides.setdefault("default_base_model", "tiny-random-llama")
    overrides = {**NO_REAPER, **overrides}
    return Settings(data_dir=data_dir, model_cache_dir=model_cache_dir, **overrides)


def production_settings(
    data_dir: Path, model_cache_dir: Path, pg_url: str, redis_url: str, s3: S3Endpoint, **overrides: Any
) -> Settings:
    return Settings(
        data_dir=data_dir,
        model_cache_dir=model_cache_dir,
        default_base_model="tiny-random-llama",
        database_url=pg_url,
        broker_url=redis_url,
        storage_url=f"s3://{S3_BUCKET}/run-{uuid.uuid4().hex[:8]}",
        s3_endpoint_url=s3.url,
        s3_access_key_id=S3_KEY,
        s3_secret_access_key=S3_KEY,
        queue_name=f"training-{uuid.uuid4().hex[:8]}",
        **{**NO_REAPER, **overrides},
    )


@pytest.fixture(params=["embedded", "production"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings(backend: str, tmp_path: Path, model_cache_dir: Path, request: pytest.FixtureRequest) -> Settings:
    if backend == "embedded":
        s = embedded_settings(tmp_path / "data", model_cache_dir)
        migrate(s.db_url)
        return s
    return production_settings(
        tmp_path / "data",
        model_cache_dir,
        request.getfixturevalue("pg_url"),
        request.getfixturevalue("redis_url"),
        request.getfixturevalue("s3"),
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


@dataclass
class Tenant:
    name: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture
def make_tenant(settings: Settings) -> Any:
    def make() -> Tenant:
        name = f"tenant-{uuid.uuid4().hex[:8]}"
        with session_scope(settings.db_url) as session:
            key = create_api_key(session, tenant_name=name)
        return Tenant(name, key)

    return make


@pytest.fixture
def tenant(make_tenant: Any) -> Tenant:
    return make_tenant()  # type: ignore[no-any-return]


# --- data -----------------------------------------------------------------------------------------
WORDS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"]


def chat_lines(n: int = 8) -> list[str]:
    return [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"Name fruit number {i}."},
                    {"role": "assistant", "content": WORDS[i % len(WORDS)]},
                ]
            }
        )
        for i in range(n)
    ]


def jsonl(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def upload(client: TestClient, tenant: Tenant, content: bytes, filename: str = "train.jsonl") -> Any:
    return client.post(
        "/v1/files", headers=tenant.headers, files={"file": (filename, content)}, data={"purpose": "fine-tune"}
    )
