"""Fault tests against the real processes (`tuneforge api`, `tuneforge worker`) on PostgreSQL, Redis and S3:
a worker killed with kill -9, a worker stopped gracefully, the API killed and restarted, the database cut off
behind a loopback proxy, two workers sharing twenty jobs, a cancel that frees the worker, the object store cut
off from a worker that resumes a job, a cancel racing a resume, a worker whose clock is two minutes behind; and
jobs on 2 devices (torchrun, gloo ranks): a killed rank, a killed worker, pause, resume and cancel.

Each test has a database of its own and short heartbeats (0.5 s, stale after 3 s) and reaper rounds (1 s).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from app.core.db import migrate
from tests.conftest import S3_BUCKET, S3_KEY, S3Endpoint, address, chat_lines, free_port
from worker.runner import CHECKPOINT_UNREADABLE_MESSAGE

pytestmark = pytest.mark.e2e
TUNEFORGE = [sys.executable, "-m", "app.cli"]


class TcpProxy:
    """A loopback TCP proxy to PostgreSQL that a test can cut (every connection closed, new ones refused) and
    restore on the same port: what a database restart or a network partition looks like to the processes."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def cut(self) -> None:
        assert self._listener is not None
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class ObjectStoreProxy(TcpProxy):
    """A loopback TCP proxy to the S3 endpoint with a tripwire on the first request for a checkpoint's training
    state (what a worker resuming a job fetches first): `outage` cuts the store off from that request on (every
    connection closed, new ones refused) until `restore`; `hold` keeps such requests waiting until `release`."""

    def __init__(self, target_port: int, on_state_request: str) -> None:
        self.on_state_request = on_state_request
        self.tripped = threading.Event()
        self._released = threading.Event()
        self._armed = False
        super().__init__(target_port)
        self._armed = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        self._armed = False
        super().restore()

    def release(self) -> None:
        self._armed = False
        self._released.set()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                request_line = data.split(b"\r\n", 1)[0]
                if self._armed and request_line.startswith(b"GET ") and b"/state.pt " in request_line:
                    self.tripped.set()
                    if self.on_state_request == "outage":
                        self.cut()
                        return
                    self._released.wait(timeout=60)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@dataclass
class Cluster:
    """One deployment: a database of its own (through a proxy), a queue, a storage prefix; API and workers
    started and stopped by the test."""

    env: dict[str, str]
    tmp: Path
    proxy: TcpProxy
    key: str = ""
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.env['TUNEFORGE_PORT']}"

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=30)

    def start(self, name: str, **env: str) -> subprocess.Popen[bytes]:
        """`api` or `worker…` (any number of workers), with `env` over the cluster's environment."""
        role = "api" if name == "api" else "worker"
        with (self.tmp / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen([*TUNEFORGE, role], env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        if role == "api":
            wait_for(lambda: healthy(self.url), 60, "the API did not come up", self)
        return proc

    def kill(self, name: str, sig: int = signal.SIGKILL, timeout: float = 60) -> int:
        proc = self.procs.pop(name)
        proc.send_signal(sig)
        return proc.wait(timeout=timeout)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-5000:]}" for p in sorted(self.tmp.glob("*.log")))

    def job(self, job_id: str) -> dict[str, Any]:
        with self.http() as http:
            return http.get(f"/jobs/{job_id}").json()  # type: ignore[no-any-return]

    def events(self, job_id: str) -> list[dict[str, Any]]:
        with self.http() as http:
            return http.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]  # type: ignore[no-any-return]

    def create_job(self, n_lines: int = 8, devices: int = 1, method: str = "lora", **hyperparameters: Any) -> str:
        with self.http() as http:
            file_id = http.post("/v1/files", files={"file": ("t.jsonl", "\n".join(chat_lines(n_lines)))}).json()["id"]
            r = http.post(
                "/jobs",
                json={
                    "base_model": "tiny-random-llama",
                    "method": method,
                    "training_file": file_id,
                    "hyperparameters": hyperparameters,
                    "resources": {"devices": devices},
                },
            )
            assert r.status_code == 201, r.text
            return str(r.json()["id"])

    def wait_status(self, job_id: str, statuses: set[str], timeout: float = 180) -> dict[str, Any]:
        found: dict[str, Any] = {}

        def reached() -> bool:
            found.update(self.job(job_id))
            return found["status"] in statuses

        wait_for(reached, timeout, f"job {job_id} never reached {statuses}", self)
        return found

    def wait_step(self, job_id: str, step: int, *, checkpoints: int = 0) -> None:
        def there() -> bool:
            if self.job(job_id)["progress"]["step"] < step:
                return False
            with self.http() as http:
                return len(http.get(f"/jobs/{job_id}/checkpoints").json()["data"]) >= checkpoints

        wait_for(there, 120, f"job {job_id} never reached step {step}", self)


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for(condition: Callable[[], bool], timeout: float, message: str, cluster: Cluster) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{message}\n{cluster.logs()}"
        time.sleep(0.2)


@pytest.fixture
def cluster(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    model_cache_dir: Path,
    pg_admin_dsn: str,
    redis_url: str,
    s3: S3Endpoint,
) -> Iterator[Cluster]:
    name = f"tuneforge_fault_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    _, pg_port = address(pg_admin_dsn, 5432)
    proxy = TcpProxy(pg_port)
    base = pg_admin_dsn.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    db_url = f"{base}/{name}".replace(f":{pg_port}/", f":{proxy.port}/")
    migrate(db_url)
    run = uuid.uuid4().hex[:8]
    env = {
        **os.environ,
        "TUNEFORGE_DATA_DIR": str(tmp_path / "data"),
        "TUNEFORGE_MODEL_CACHE_DIR": str(model_cache_dir),
        "TUNEFORGE_PORT": str(free_port()),
        "TUNEFORGE_DATABASE_URL": db_url,
        "TUNEFORGE_BROKER_URL": redis_url,
        "TUNEFORGE_QUEUE_NAME": f"fault-{run}",
        "TUNEFORGE_STORAGE_URL": f"s3://{S3_BUCKET}/fault-{run}",
        "TUNEFORGE_S3_ENDPOINT_URL": s3.url,
        "TUNEFORGE_S3_ACCESS_KEY_ID": S3_KEY,
        "TUNEFORGE_S3_SECRET_ACCESS_KEY": S3_KEY,
        "TUNEFORGE_DEFAULT_BASE_MODEL": "tiny-random-llama",
        "TUNEFORGE_HEARTBEAT_SECONDS": "0.5",
        "TUNEFORGE_HEARTBEAT_TIMEOUT_SECONDS": "3",
        "TUNEFORGE_REAPER_SECONDS": "1",
        "TUNEFORGE_MAX_ACTIVE_JOBS_PER_TENANT": "100",
        "PYTHONUNBUFFERED": "1",
        **getattr(request, "param", {}),
    }
    keys = subprocess.run(
        [*TUNEFORGE, "keys", "create", "--tenant", "faults"], env=env, check=True, capture_output=True
    )
    cluster = Cluster(env=env, tmp=tmp_path, proxy=proxy, key=keys.stdout.decode().strip())
    try:
        yield cluster
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        for proc in cluster.procs.values():
            proc.kill()
            proc.wait(timeout=30)
        proxy.cut()
        from app.core.db import get_engine

        get_engine(db_url).dispose()
        with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def assert_each_step_once(cluster: Cluster, job: dict[str, Any]) -> list[dict[str, Any]]:
    events = cluster.events(job["id"])
    steps = [e["data"]["step"] for e in events if e["type"] == "metrics"]
    assert steps == list(range(1, job["progress"]["total_steps"] + 1)), steps
    return events


# 24 examples one at a time for 2 epochs: 48 steps, a checkpoint every 8 and at each epoch's end.
LONG = {"n_lines": 24, "n_epochs": 2, "batch_size": 1, "checkpoint_every": 8}


def long_job(cluster: Cluster) -> str:
    spec = dict(LONG)
    return cluster.create_job(spec.pop("n_lines"), **spec)


def test_a_worker_killed_mid_job_is_replaced_and_the_job_resumes_from_its_checkpoint(cluster: Cluster) -> None:
    cluster.start("api")
    cluster.start("worker-a")
    job_id = long_job(cluster)
    cluster.wait_step(job_id, 10, checkpoints=1)  # past a checkpoint: steps 9-10 (or more) are trained again
    cluster.kill("worker-a")  # kill -9: no handler runs
    cluster.start("worker-b")
    job = cluster.wait_status(job_id, {"succeeded", "failed"})
    assert job["status"] == "succeeded", job["error"]
    assert job["attempt"] == 2 and job["adapter_id"]
    messages = [e["message"] for e in assert_each_step_once(cluster, job)]
    assert any("stopped answering" in m for m in messages)  # the reaper's event
    assert any(m.startswith("attempt 2: resumed from checkpoint") for m in messages), messages


def test_a_worker_stopped_gracefully_hands_the_job_back_and_it_completes(cluster: Cluster) -> None:
    cluster.start("api")
    cluster.start("worker-a")
    job_id = long_job(cluster)
    cluster.wait_step(job_id, 5)
    started = time.monotonic()
    assert cluster.kill("worker-a", signal.SIGTERM) == 0
    assert time.monotonic() - started < 30
    job = cluster.job(job_id)
    assert job["status"] == "queued" and job["error"] is None, job
    stopped_at = job["progress"]["step"]
    assert cluster.events(job_id)[-1]["message"].startswith(f"the worker was stopped at step {stopped_at};")
    cluster.start("worker-b")
    job = cluster.wait_status(job_id, {"succeeded", "failed"})
    assert job["status"] == "succeeded" and job["attempt"] == 2, job["error"]
    messages = [e["message"] for e in assert_each_step_once(cluster, job)]
    assert any(
        m.startswith("attempt 2: resumed from checkpoint") and m.endswith(f"at step {stopped_at}") for m in messages
    )


def test_the_api_killed_and_restarted_mid_job_changes_nothing_for_the_job(cluster: Cluster) -> None:
    cluster.start("api")
    cluster.start("worker")
    job_id = long_job(cluster)
    cluster.wait_step(job_id, 3)
    cluster.kill("api")
    time.sleep(4)  # longer than the heartbeat timeout: a restarted API's reaper must still leave the job alone
    cluster.start("api")
    job = cluster.wait_status(job_id, {"succeeded", "failed"})
    assert job["status"] == "succeeded" and job["attempt"] == 1
    messages = [e["message"] for e in assert_each_step_once(cluster, job)]
    assert not any("stopped answering" in m or m.startswith("training started again") for m in messages)


@pytest.mark.parametrize("cluster", [{"TUNEFORGE_HEARTBEAT_TIMEOUT_SECONDS": "60"}], indirect=True)
def test_a_lost_database_is_a_503_and_the_api_and_the_worker_recover_by_themselves(cluster: Cluster) -> None:
    cluster.start("api")
    cluster.start("worker")
    job_id = long_job(cluster)
    cluster.wait_step(job_id, 3)
    cluster.proxy.cut()
    try:
        with cluster.http() as http:
            for _ in range(3):  # while it is gone, and without hanging
                started = time.monotonic()
                r = http.get(f"/jobs/{job_id}")
                assert r.status_code == 503, r.text
                assert time.monotonic() - started < 5
                error = r.json()["error"]
                assert error["code"] == "database_unavailable"
                assert str(cluster.proxy.port) not in error["message"]  # the database's address is not leaked
                assert r.headers["retry-after"] == "5"
                assert http.post("/jobs", json={"training_file": "file-x"}).status_code == 503
                time.sleep(1)
        # Down until the worker has met it in the middle of the job (and is retrying its write).
        worker_log = cluster.tmp / "worker.log"
        wait_for(lambda: "the database did not answer" in worker_log.read_text(), 60, "no retry", cluster)
    finally:
        cluster.proxy.restore()
    with cluster.http() as http:
        wait_for(lambda: http.get(f"/jobs/{job_id}").status_code == 200, 30, "the API did not recover", cluster)
    job = cluster.wait_status(job_id, {"succeeded", "failed"})
    assert job["status"] == "succeeded" and job["attempt"] == 1, job["error"]
    assert_each_step_once(cluster, job)  # its writes were retried: none lost, none twice


def test_two_workers_and_twenty_jobs_every_job_runs_exactly_once(cluster: Cluster) -> None:
    cluster.start("api")
    cluster.start("worker-a")
    cluster.start("worker-b")
    job_ids = [cluster.create_job(8, n_epochs=1, batch_size=4) for _ in range(20)]
    jobs = [cluster.wait_status(job_id, {"succeeded", "failed", "cancelled"}) for job_id in job_ids]
    assert [j["status"] for j in jobs] == ["succeeded"] * 20, [j["error"] for j in jobs]
    assert [j["attempt"] for j in jobs] == [1] * 20
    assert len({j["adapter_id"] for j in jobs}) == 20
    for job in jobs:
        started = [e for e in cluster.events(job["id"]) if e["data"].get("status") == "running"]
        assert len(started) == 1
    # Both workers took jobs (the queue is shared, not the work duplicated).
    logs = {name: (cluster.tmp / f"{name}.log").read_text() for name in ("worker-a", "worker-b")}
    claimed = {name: sum(f"job {j}: attempt 1 started" in log for j in job_ids) for name, log in logs.items()}
    assert sum(claimed.values()) == 20 and all(count > 0 for count in claimed.values()), claimed


def test_a_cancelled_running_job_frees_the_worker_for_the_job_behind_it(cluster: Cluster) -> None:
    cluster.start("api")
    cluster.start("worker")
    long_id = cluster.create_job(40, n_epochs=100, batch_size=1, checkpoint_every=2)
    behind = cluster.create_job(8, n_epochs=1, batch_size=4)
    cluster.wait_step(long_id, 5, checkpoints=1)
    with cluster.http() as http:
        cancelled = http.post(f"/jobs/{long_id}/cancel").json()
        checkpoints_then = http.get(f"/jobs/{long_id}/checkpoints").json()["data"]
    assert cancelled["status"] == "cancelled"
    job = cluster.wait_status(behind, {"succeeded", "failed"}, timeout=120)
    assert job["status"] == "succeeded", job["error"]
    stopped = cluster.job(long_id)
    assert stopped["status"] == "cancelled" and stopped["adapter_id"] is None
    assert stopped["progress"]["step"] <= cancelled["progress"]["step"] + 1  # within one optimizer step
    with cluster.http() as http:
        kept = http.get(f"/jobs/{long_id}/checkpoints").json()["data"]
    assert kept and kept[0]["step_number"] >= checkpoints_then[0]["step_number"]
    assert cluster.events(long_id)[-1]["message"] == "training stopped: the job was cancelled"


# --- resuming deletes no checkpoint; the database's clock ---------------------------------------------------
def stopped_after_checkpoints(cluster: Cluster) -> tuple[str, list[dict[str, Any]]]:
    """A long job that worker-a trained past two checkpoints, then handed back when stopped (SIGTERM); and its
    checkpoints then."""
    cluster.start("api")
    cluster.start("worker-a")
    job_id = long_job(cluster)
    cluster.wait_step(job_id, 17, checkpoints=2)
    assert cluster.kill("worker-a", signal.SIGTERM) == 0
    assert cluster.job(job_id)["status"] == "queued"
    with cluster.http() as http:
        kept = http.get(f"/jobs/{job_id}/checkpoints").json()["data"]
    assert len(kept) >= 2
    return job_id, kept


def assert_every_checkpoint_downloadable(cluster: Cluster, job_id: str, kept: list[dict[str, Any]]) -> None:
    with cluster.http() as http:
        listed = {c["id"] for c in http.get(f"/jobs/{job_id}/checkpoints").json()["data"]}
        for checkpoint in kept:
            assert checkpoint["id"] in listed, (checkpoint["id"], sorted(listed))
            download = http.get(checkpoint["download_url"])
            assert download.status_code == 200, download.text
            assert hashlib.sha256(download.content).hexdigest() == checkpoint["sha256"]


def test_an_object_store_outage_while_a_job_resumes_hands_it_back_and_keeps_every_checkpoint(
    cluster: Cluster, s3: S3Endpoint
) -> None:
    job_id, kept = stopped_after_checkpoints(cluster)
    # worker-b reaches the store through a proxy that cuts it off when the worker asks for the checkpoint's state.
    store = ObjectStoreProxy(address(s3.url, 80)[1], on_state_request="outage")
    cluster.start("worker-b", TUNEFORGE_S3_ENDPOINT_URL=store.url, TUNEFORGE_STORAGE_RETRY_SECONDS="2")

    def handed_back() -> bool:
        return any(e["message"].startswith(CHECKPOINT_UNREADABLE_MESSAGE) for e in cluster.events(job_id))

    wait_for(handed_back, 120, "the job was not handed back", cluster)
    assert store.tripped.is_set()
    job = cluster.job(job_id)
    assert job["status"] in {"queued", "running"} and job["error"] is None, job  # back in the queue, retried
    assert_every_checkpoint_downloadable(cluster, job_id, kept)
    store.restore()  # the store answers again: the next attempt resumes from the latest checkpoint
    job = cluster.wait_status(job_id, {"succeeded", "failed", "cancelled"})
    assert job["status"] == "succeeded", job["error"]
    messages = [e["message"] for e in assert_each_step_once(cluster, job)]
    latest = kept[0]
    assert any(m.endswith(f"resumed from checkpoint {latest['id']} at step {latest['step_number']}") for m in messages)


def test_a_cancel_racing_a_resume_ends_the_job_cancelled_and_deletes_no_checkpoint(
    cluster: Cluster, s3: S3Endpoint
) -> None:
    job_id, kept = stopped_after_checkpoints(cluster)
    store = ObjectStoreProxy(address(s3.url, 80)[1], on_state_request="hold")
    cluster.start("worker-b", TUNEFORGE_S3_ENDPOINT_URL=store.url)
    wait_for(store.tripped.is_set, 120, "the worker never fetched the checkpoint's state", cluster)
    with cluster.http() as http:  # while the worker fetches the state, the user cancels (and its states go)
        cancelled = http.post(f"/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
    store.release()  # the fetch goes on, and finds no state any more
    ended = "training stopped: the job was cancelled"
    wait_for(lambda: cluster.events(job_id)[-1]["message"] == ended, 120, "the worker did not stop", cluster)
    assert cluster.job(job_id)["status"] == "cancelled"
    assert_every_checkpoint_downloadable(cluster, job_id, kept)


# Loaded at start-up by the worker's Python (a `sitecustomize` module on its PYTHONPATH): its wall clock runs
# TUNEFORGE_TEST_CLOCK_SKEW seconds off, as on a host whose clock drifted (the database's is right).
SKEWED_CLOCK = """
import datetime as _datetime
import os
import time as _time

_skew = float(os.environ["TUNEFORGE_TEST_CLOCK_SKEW"])
_real_datetime = _datetime.datetime
_real_time, _real_time_ns = _time.time, _time.time_ns


class _SkewedDatetime(_real_datetime):
    @classmethod
    def now(cls, tz=None):
        return _real_datetime.now(tz) + _datetime.timedelta(seconds=_skew)

    @classmethod
    def utcnow(cls):
        return cls.now(_datetime.timezone.utc).replace(tzinfo=None)


_datetime.datetime = _SkewedDatetime
_time.time = lambda: _real_time() + _skew
_time.time_ns = lambda: _real_time_ns() + int(_skew * 1e9)
"""


def test_a_worker_whose_clock_is_two_minutes_behind_keeps_its_job(cluster: Cluster, tmp_path: Path) -> None:
    skewed = tmp_path / "skewed-clock"
    skewed.mkdir()
    (skewed / "sitecustomize.py").write_text(SKEWED_CLOCK)
    path = os.pathsep.join(p for p in (str(skewed), os.environ.get("PYTHONPATH", "")) if p)
    cluster.start("api")
    cluster.start("worker", PYTHONPATH=path, TUNEFORGE_TEST_CLOCK_SKEW="-120")
    job_id = long_job(cluster)
    cluster.wait_step(job_id, 5)
    # The worker's clock is behind (its log lines are stamped with it)...
    stamped = [
        json.loads(line)["time"] for line in (cluster.tmp / "worker.log").read_text().splitlines() if '"time"' in line
    ]
    behind = time.time() - datetime.fromisoformat(stamped[-1]).timestamp()
    assert 110 < behind < 130, behind
    # ...and its job's heartbeat is on time, the database's clock.
    assert abs(cluster.job(job_id)["heartbeat_at"] - time.time()) < 30
    job = cluster.wait_status(job_id, {"succeeded", "failed"})
    assert job["status"] == "succeeded" and job["attempt"] == 1, job["error"]
    messages = [e["message"] for e in assert_each_step_once(cluster, job)]
    assert not any("stopped answering" in m or m.startswith("training started again") for m in messages)


# --- jobs on several devices, through the real processes (API and worker on PostgreSQL, Redis and S3) ---------


def rank_processes(job_id: str) -> list[int]:
    """The pids of the job's torchrun and ranks (their command lines name the job's folder)."""
    found = subprocess.run(["pgrep", "-f", f"ranks-{job_id}-"], capture_output=True, text=True, check=False)
    return [int(pid) for pid in found.stdout.split()]


def ranks_of(job_id: str) -> list[int]:
    """The job's rank processes (not torchrun), oldest (rank 0) first."""
    ranks = []
    for pid in rank_processes(job_id):
        with contextlib.suppress(OSError):
            if b"torch.distributed.run" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                ranks.append(pid)
    return sorted(ranks)


def wait_no_ranks(cluster: Cluster, job_id: str, timeout: float = 60) -> None:
    wait_for(lambda: not rank_processes(job_id), timeout, f"processes of {job_id} still run", cluster)


def test_a_two_device_job_survives_a_killed_rank_and_a_killed_worker(cluster: Cluster) -> None:
    cluster.start("api")
    cluster.start("worker", TUNEFORGE_WORKER_DEVICES="2")
    # Asked for more devices than any worker owns: said in its events, not waited for silently.
    warm_up = cluster.create_job(2, devices=1)
    wait_for(lambda: cluster.job(warm_up)["status"] != "queued", 60, "no worker took a job", cluster)
    too_many = cluster.create_job(8, devices=3)
    told = [e for e in cluster.events(too_many) if e["data"].get("code") == "waiting_for_devices"]
    assert told and "needs 3 devices and the largest running worker owns 2" in told[0]["message"]
    with cluster.http() as http:
        assert http.post(f"/jobs/{too_many}/cancel").status_code == 200

    job_id = long_job_on(cluster, devices=2)
    cluster.wait_step(job_id, 10, checkpoints=1)
    first, second = ranks_of(job_id)
    os.kill(second, signal.SIGKILL)  # one rank dies: the attempt ends, every rank with it, the job goes back

    def requeued() -> list[str]:
        return [
            m["message"]
            for m in cluster.events(job_id)
            if m["type"] == "status" and "back in the queue" in m["message"]
        ]

    # Waited for by its events, not by a step: the tiny model trains a step in tens of milliseconds, so the dying
    # attempt may already have reported the steps a resumed one was to reach.
    wait_for(
        lambda: bool(requeued()), 60, f"{job_id} was not put back in the queue when one of its ranks died", cluster
    )
    resumed = "resumed from checkpoint"  # ... and resumes on the same worker
    wait_for(lambda: any(resumed in e["message"] for e in cluster.events(job_id)), 120, "no resume", cluster)
    events = cluster.events(job_id)
    requeued_messages = requeued()
    # Said by the worker ("one of the job's 2 processes stopped"), or, where a loaded machine delayed the worker's
    # heartbeat past the fixture's 3 s, by the reaper first ("stopped answering"): either way, back in the queue.
    assert any("one of the job's 2 processes stopped" in m or "stopped answering" in m for m in requeued_messages), (
        f"{[e['message'] for e in events]}\n{cluster.logs()}"
    )
    assert first not in ranks_of(job_id)
    # The worker itself killed outright: its ranks die with it; the reaper re-queues the job for the next worker.
    stale = ranks_of(job_id)
    cluster.kill("worker")
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in stale), 30, "ranks outlived the worker", cluster)
    cluster.start("worker2", TUNEFORGE_WORKER_DEVICES="2")
    job = cluster.wait_status(job_id, {"succeeded", "failed"}, timeout=300)
    assert job["status"] == "succeeded", job["error"]
    assert job["metrics"]["ranks"] == 2 and job["resources"] == {"devices": 2}
    assert_each_step_once(cluster, job)
    wait_no_ranks(cluster, job_id)


def test_a_two_device_job_pauses_resumes_is_handed_back_and_cancels_like_any_job(cluster: Cluster) -> None:
    cluster.start("api")
    cluster.start("worker", TUNEFORGE_WORKER_DEVICES="2")
    job_id = long_job_on(cluster, devices=2, method="full")
    cluster.wait_step(job_id, 3)
    with cluster.http() as http:
        assert http.post(f"/jobs/{job_id}/pause").status_code == 200
    paused = cluster.wait_status(job_id, {"paused"})
    wait_no_ranks(cluster, job_id)
    with cluster.http() as http:
        assert http.post(f"/jobs/{job_id}/resume").status_code == 200
    cluster.wait_step(job_id, paused["progress"]["step"] + 2)
    assert any("resumed from checkpoint" in e["message"] for e in cluster.events(job_id))
    # The worker stopped gracefully: its ranks checkpoint the step and the job goes back to the queue.
    assert cluster.kill("worker", signal.SIGTERM) == 0
    job = cluster.job(job_id)
    assert job["status"] == "queued", job
    handed_back = f"the worker was stopped at step {job['progress']['step']};"
    assert any(e["message"].startswith(handed_back) for e in cluster.events(job_id)[-3:])
    wait_no_ranks(cluster, job_id, timeout=5)
    cluster.start("worker2", TUNEFORGE_WORKER_DEVICES="2")
    cluster.wait_step(job_id, job["progress"]["step"] + 2)
    with cluster.http() as http:
        assert http.post(f"/jobs/{job_id}/cancel").status_code == 200
    assert cluster.wait_status(job_id, {"cancelled"})["adapter_id"] is None
    wait_no_ranks(cluster, job_id)


def long_job_on(cluster: Cluster, *, devices: int, method: str = "lora") -> str:
    spec = dict(LONG)
    return cluster.create_job(spec.pop("n_lines"), devices=devices, method=method, **spec)
