"""Load on the real API over loopback: latency and throughput of the job endpoints, and a burst that loses nothing.

    .venv/bin/python bench/api_load.py [--clients 50] [--seconds 8] [--interval 0.5] [--jobs 500]
                                       [--pg-admin postgresql://postgres@127.0.0.1:5432/postgres]
                                       [--redis redis://127.0.0.1:6379/12] [--model-cache-dir DIR]

It starts the production shape on this machine, as an operator would: a fresh PostgreSQL database (created here,
dropped at the end), `tuneforge migrate`, two tenants from `tuneforge keys create`, and `tuneforge api` (one uvicorn
process, as the command runs it) with Celery over Redis on a queue of its own and objects in a temporary folder.
No worker runs, so every job it creates stays queued and every task it sends stays in the Redis list.

1. Burst: --jobs real `POST /jobs` sent at once (one connection each). Every one must answer 2xx, and then the
   tenant must have exactly that many job rows in PostgreSQL (counted there, not through the API) and the queue
   exactly that many messages (LLEN of the kombu list). Its latencies are printed too.
2. The endpoints `GET /jobs/{id}` (one of the burst's jobs at random), `GET /jobs` (first page, 20 jobs), `POST /jobs`
   with `"dry_run": true` and a real `POST /jobs`, and as the baseline `GET /healthz` (the same server and framework
   path without authentication or database), each under two load shapes of --clients concurrent clients:
   - closed loop: each client sends its next request as soon as the last one is answered, for --seconds: the
     saturation throughput; latency then is about clients / throughput (Little's law), so it says little alone;
   - pollers: each client sends one request every --interval seconds (staggered), for --seconds, as dashboards
     polling a job do. Latency is measured from when the request was due, not when it went out, so a client held
     back by a slow answer counts the wait (no coordinated omission).
   Per endpoint and shape: requests, non-2xx answers and transport errors, p50 / p99 / max latency, throughput,
   and the CPU time the API process and this (client) process spent, as a share of one core: on 2 cores the client
   competes with the API, so a closed loop measures both. The clients drop a connection idle for 2 s, before the
   API's keep-alive timeout closes it, so that a transport error counted is the API's, not a keep-alive race.
3. At the end, every job row of the database against every message in the queue (one each: nothing lost, nothing
   twice), the API process's peak RSS (VmHWM), and `GET /jobs/{id}` against the `GET /healthz` baseline.

The target checked (the issue's): `GET /jobs/{id}` p99 under 25 ms with 50 pollers on PostgreSQL, no request lost.
The first run builds the tiny model's tokenizer into the model cache (about half a minute); a run takes about two
minutes on 2 CPU cores. Exits 1 if a request was lost (a non-2xx answer or a transport error) or a count is off; the
latency target is printed, met or not: on a machine shared with other work it measures that work too (the load
average is printed at the start and the end).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import psycopg
import redis
from common import default_models_dir, load_average, wait_ready  # bench/, beside this

TUNEFORGE = [sys.executable, "-m", "app.cli"]
BASE_MODEL = "tiny-random-llama"
TARGET_P99_MS = 25.0
# kombu's Redis transport keeps a queue's messages of priority p > 0 under "<queue>\x06\x16<p>".
KOMBU_PRIORITY_SEP = "\x06\x16"

# The clients drop a connection idle this long, before the API's keep-alive timeout (uvicorn's default, 5 s) closes
# it: at equal timeouts, a request sent on a connection just as the server closes it fails (a race of HTTP/1.1
# keep-alive, not a request the API lost), and an error here must be the API's.
CLIENT_KEEPALIVE_EXPIRY = 2.0

Request = Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]


# --- measurement --------------------------------------------------------------------------------------------------
@dataclass
class Stats:
    """What one endpoint under one load shape did: every latency (s), every failure, and the CPU spent."""

    latencies: list[float] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    elapsed: float = 0.0
    api_cpu: float = 0.0
    client_cpu: float = 0.0
    offered_rps: float | None = None

    @property
    def count(self) -> int:
        return len(self.latencies)

    def percentile_ms(self, q: float) -> float:
        """Nearest-rank percentile, in ms."""
        ordered = sorted(self.latencies)
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)] * 1000 if ordered else float("nan")

    @property
    def throughput(self) -> float:
        return self.count / self.elapsed if self.elapsed else 0.0

    def record(self, started: float, outcome: httpx.Response | BaseException) -> None:
        self.latencies.append(time.perf_counter() - started)
        if isinstance(outcome, BaseException):
            self.failures[type(outcome).__name__] += 1
        elif not 200 <= outcome.status_code < 300:
            self.failures[str(outcome.status_code)] += 1

    @property
    def overloaded(self) -> bool:
        """Offered more than it served: requests queued up through the phase."""
        return self.offered_rps is not None and self.throughput < 0.95 * self.offered_rps

    def row(self, label: str) -> str:
        offered = f"{self.offered_rps:.0f}{'*' if self.overloaded else ''}" if self.offered_rps else "-"
        return (
            f"{label:<38} {self.count:6d} {self.percentile_ms(0.50):8.1f} {self.percentile_ms(0.99):8.1f} "
            f"{self.percentile_ms(1.0):8.1f} {self.throughput:7.1f} {offered:>7} {sum(self.failures.values()):7d} "
            f"{self.api_cpu / self.elapsed:7.0%} {self.client_cpu / self.elapsed:7.0%} "
            f"{self.api_cpu / max(self.count, 1) * 1000:8.2f}"
        )


HEADER = (
    f"{'endpoint, load shape':<38} {'reqs':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'req/s':>7} {'offered':>7} "
    f"{'non-2xx':>7} {'API cpu':>7} {'client':>7} {'cpu/req':>8}"
)
HEADER_NOTE = (
    "(latency in ms from when the request was due; API cpu and client: CPU time of the API process and of this one "
    "as a share of one core; cpu/req: API CPU ms per request)"
)


async def send(client: httpx.AsyncClient, request: Request) -> httpx.Response | BaseException:
    try:
        response = await request(client)
        await response.aclose()
        return response
    except httpx.HTTPError as exc:
        return exc


def api_cpu_seconds(api: psutil.Process) -> float:
    """User + system CPU time of the API process and its children (uvicorn's workers, if it runs several)."""
    total = 0.0
    for process in (api, *api.children(recursive=True)):
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


class CpuMeter:
    """CPU seconds of the API and of this process (the clients) over a phase."""

    def __init__(self, api: psutil.Process) -> None:
        self.api = api

    def __enter__(self) -> CpuMeter:
        self.api_start = api_cpu_seconds(self.api)
        self.client_start = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.api_cpu = api_cpu_seconds(self.api) - self.api_start
        self.client_cpu = time.process_time() - self.client_start


async def closed_loop(client: httpx.AsyncClient, request: Request, clients: int, seconds: float) -> Stats:
    stats = Stats()
    deadline = time.perf_counter() + seconds

    async def one_client() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            stats.record(started, await send(client, request))

    started = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    stats.elapsed = time.perf_counter() - started
    return stats


async def pollers(client: httpx.AsyncClient, request: Request, clients: int, seconds: float, interval: float) -> Stats:
    stats = Stats(offered_rps=clients / interval)
    begin = time.perf_counter() + 0.05
    end = begin + seconds

    async def one_client(index: int) -> None:
        due = begin + interval * index / clients  # staggered over one interval, as independent pollers are
        while due < end:
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            stats.record(due, await send(client, request))  # from when it was due: waiting counts
            due += interval

    await asyncio.gather(*(one_client(i) for i in range(clients)))
    stats.elapsed = time.perf_counter() - begin
    return stats


async def burst(
    url: str, headers: dict[str, str], body: Callable[[], dict[str, object]], n: int, api: psutil.Process
) -> Stats:
    """`n` POST /jobs at once, each on its own connection."""
    stats = Stats()
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n, keepalive_expiry=CLIENT_KEEPALIVE_EXPIRY)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300, limits=limits) as client:
        gate = asyncio.Event()

        async def one() -> None:
            await gate.wait()
            started = time.perf_counter()
            stats.record(started, await send(client, lambda c: c.post("/jobs", json=body())))

        tasks = [asyncio.create_task(one()) for _ in range(n)]
        await asyncio.sleep(0)  # every task waits at the gate before it opens
        with CpuMeter(api) as cpu:
            started = time.perf_counter()
            gate.set()
            await asyncio.gather(*tasks)
            stats.elapsed = time.perf_counter() - started
        stats.api_cpu, stats.client_cpu = cpu.api_cpu, cpu.client_cpu
    return stats


# --- the service under test ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peak_rss_mib(api: psutil.Process) -> float:
    """The peak resident set (VmHWM) of the API process, plus its children's if it has any, in MiB."""
    total = 0.0
    for process in (api, *api.children(recursive=True)):
        status = Path(f"/proc/{process.pid}/status")
        peaks = (
            [line for line in status.read_text().splitlines() if line.startswith("VmHWM:")] if status.exists() else []
        )
        # Without /proc: the current RSS, a lower bound of the peak.
        total += int(peaks[0].split()[1]) * 1024 if peaks else process.memory_info().rss
    return total / 2**20


@dataclass
class Deployment:
    """A database, a queue and a folder of this run's own; removed by `close`."""

    admin_dsn: str
    broker: str
    model_cache_dir: Path
    name: str = field(default_factory=lambda: f"tuneforge_bench_{uuid.uuid4().hex[:8]}")
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tuneforge-api-load-")))
    api: subprocess.Popen[bytes] | None = None
    database_created: bool = False

    @property
    def dsn(self) -> str:
        return f"{self.admin_dsn.rsplit('/', 1)[0]}/{self.name}"

    @property
    def queue(self) -> str:
        return self.name.replace("_", "-")

    def env(self, port: int) -> dict[str, str]:
        return {
            **os.environ,
            "TUNEFORGE_DATABASE_URL": self.dsn.replace("postgresql://", "postgresql+psycopg://", 1),
            "TUNEFORGE_BROKER_URL": self.broker,
            "TUNEFORGE_QUEUE_NAME": self.queue,
            "TUNEFORGE_DATA_DIR": str(self.workdir / "data"),
            "TUNEFORGE_STORAGE_URL": (self.workdir / "objects").as_uri(),
            "TUNEFORGE_MODEL_CACHE_DIR": str(self.model_cache_dir),
            "TUNEFORGE_DEFAULT_BASE_MODEL": BASE_MODEL,
            "TUNEFORGE_MAX_ACTIVE_JOBS_PER_TENANT": "100000",
            "TUNEFORGE_DEVICE": "cpu",
            "TUNEFORGE_PORT": str(port),
            "PYTHONUNBUFFERED": "1",
        }

    def start(self, port: int) -> tuple[str, dict[str, str]]:
        """Create the database, migrate it, make two tenants' keys and start the API; returns its URL and the keys."""
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        self.database_created = True
        env = self.env(port)
        subprocess.run([*TUNEFORGE, "migrate"], env=env, check=True, capture_output=True)
        keys = {}
        for tenant in ("burst", "load"):
            made = subprocess.run(
                [*TUNEFORGE, "keys", "create", "--tenant", f"{self.queue}-{tenant}"],
                env=env,
                check=True,
                capture_output=True,
            )
            keys[tenant] = made.stdout.decode().strip()
        with (self.workdir / "api.log").open("wb") as log:
            self.api = subprocess.Popen([*TUNEFORGE, "api"], env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, self.api, self.api_log)
        return url, keys

    def api_log(self) -> str:
        path = self.workdir / "api.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def api_problems(self, limit: int = 40) -> str:
        """The API log's last lines that are not access-log lines of 2xx answers: warnings, errors, tracebacks."""
        path = self.workdir / "api.log"
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        problems = [line for line in lines if not (line.startswith("INFO:") and '" 2' in line)]
        return "\n".join(problems[-limit:])

    def count_jobs(self, tenant: str | None = None) -> int:
        with psycopg.connect(self.dsn) as conn:
            if tenant is None:
                row = conn.execute("SELECT count(*) FROM jobs").fetchone()
            else:
                row = conn.execute(
                    "SELECT count(*) FROM jobs JOIN tenants ON tenants.id = jobs.tenant_id WHERE tenants.name = %s",
                    (f"{self.queue}-{tenant}",),
                ).fetchone()
        assert row is not None
        return int(row[0])

    def queued_messages(self) -> int:
        """Messages waiting in the queue's Redis lists (every priority)."""
        r = redis.Redis.from_url(self.broker)
        keys = [self.queue, *(k for k in r.scan_iter(match=f"{self.queue}{KOMBU_PRIORITY_SEP}*"))]
        return sum(int(r.llen(key)) for key in keys)

    def close(self) -> None:
        if self.api is not None and self.api.poll() is None:
            self.api.send_signal(signal.SIGTERM)
            try:
                self.api.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.api.kill()
                self.api.wait()
        r = redis.Redis.from_url(self.broker)
        ours = [k for k in r.scan_iter(match=f"*{self.queue}*")]
        if ours:
            r.delete(*ours)
        if self.database_created:
            with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        shutil.rmtree(self.workdir, ignore_errors=True)


def training_file() -> bytes:
    """A small chat file, as the tests upload."""
    words = ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"]
    lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"Name fruit number {i}."},
                    {"role": "assistant", "content": words[i % len(words)]},
                ]
            }
        )
        for i in range(16)
    ]
    return ("\n".join(lines) + "\n").encode()


def upload(url: str, headers: dict[str, str]) -> str:
    response = httpx.post(
        f"{url}/v1/files",
        headers=headers,
        files={"file": ("train.jsonl", training_file())},
        data={"purpose": "fine-tune", "base_model": BASE_MODEL},
        timeout=600,  # the first upload builds the tokenizer into the model cache
    )
    response.raise_for_status()
    return str(response.json()["id"])


def job_body(file_id: str, *, dry_run: bool = False) -> dict[str, object]:
    return {
        "base_model": BASE_MODEL,
        "method": "lora",
        "training_file": file_id,
        "hyperparameters": {"n_epochs": 1, "batch_size": 4},
        "dry_run": dry_run,
    }


# --- the run ------------------------------------------------------------------------------------------------------
async def load_phases(
    url: str,
    keys: dict[str, str],
    files: dict[str, str],
    job_ids: list[str],
    args: argparse.Namespace,
    api: psutil.Process,
) -> dict[tuple[str, str], Stats]:
    rng = random.Random(0)
    endpoints: dict[str, tuple[str, Request]] = {
        "GET /healthz (baseline)": ("burst", lambda c: c.get("/healthz")),
        "GET /jobs/{id}": ("burst", lambda c: c.get(f"/jobs/{rng.choice(job_ids)}")),
        "GET /jobs": ("burst", lambda c: c.get("/jobs")),
        "POST /jobs (dry run)": ("load", lambda c: c.post("/jobs", json=job_body(files["load"], dry_run=True))),
        "POST /jobs": ("load", lambda c: c.post("/jobs", json=job_body(files["load"]))),
    }
    results: dict[tuple[str, str], Stats] = {}
    limits = httpx.Limits(
        max_connections=args.clients, max_keepalive_connections=args.clients, keepalive_expiry=CLIENT_KEEPALIVE_EXPIRY
    )
    for name, (tenant, request) in endpoints.items():
        headers = {"Authorization": f"Bearer {keys[tenant]}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as client:
            if name != "POST /jobs":  # warm-up: open the connections, fill the API's pools and caches
                await closed_loop(client, request, args.clients, 1.0)
            for shape in ("closed loop", "pollers"):
                with CpuMeter(api) as cpu:
                    if shape == "closed loop":
                        stats = await closed_loop(client, request, args.clients, args.seconds)
                    else:
                        stats = await pollers(client, request, args.clients, args.seconds, args.interval)
                stats.api_cpu, stats.client_cpu = cpu.api_cpu, cpu.client_cpu
                results[(name, shape)] = stats
                print(stats.row(f"{name}, {shape}"), flush=True)
    if any(stats.overloaded for stats in results.values()):
        print("* offered more than the API served: requests queued up through the phase, and their latency with them")
    return results


def run(args: argparse.Namespace) -> bool:
    deployment = Deployment(args.pg_admin, args.redis, args.model_cache_dir)
    ok = True
    try:
        load_at_start = load_average()
        url, keys = deployment.start(free_port())
        assert deployment.api is not None
        api = psutil.Process(deployment.api.pid)
        with psycopg.connect(deployment.dsn) as conn:
            server = conn.info.server_version
        print(
            f"API: `tuneforge api`, one uvicorn process, pid {api.pid} at {url}; PostgreSQL {server // 10000}."
            f"{server % 10000} database {deployment.name}; Redis {args.redis} queue {deployment.queue}; no worker",
            flush=True,
        )
        print(
            f"load: {args.clients} clients, {args.seconds:g} s per phase, pollers every {args.interval:g} s, "
            f"burst of {args.jobs}; {psutil.cpu_count()} CPUs, load average {load_at_start} (1/5/15 min) at start"
        )
        files = {tenant: upload(url, {"Authorization": f"Bearer {key}"}) for tenant, key in keys.items()}
        print(f"API RSS after start and one upload for each of 2 tenants: {api.memory_info().rss / 2**20:.0f} MiB")
        print(HEADER_NOTE)
        print(HEADER, flush=True)

        # 1. The burst, on a queue that is still empty.
        burst_headers = {"Authorization": f"Bearer {keys['burst']}"}
        stats = asyncio.run(burst(url, burst_headers, lambda: job_body(files["burst"]), args.jobs, api))
        rows, queued = deployment.count_jobs("burst"), deployment.queued_messages()
        print(stats.row(f"POST /jobs, burst of {args.jobs} at once"))
        print(
            f"  burst: {args.jobs} sent, {stats.count - sum(stats.failures.values())} answered 2xx "
            f"({dict(stats.failures) or 'none other'}); {rows} job rows in PostgreSQL, {queued} messages in the queue",
            flush=True,
        )
        if stats.failures or rows != args.jobs or queued != args.jobs:
            print(f"FAILED: expected {args.jobs} 2xx answers, {args.jobs} rows and {args.jobs} queued messages")
            ok = False
        response = httpx.get(f"{url}/jobs?limit=100", headers=burst_headers, timeout=30).json()
        job_ids = [job["id"] for job in response["data"]]

        # 2. The endpoints under both load shapes.
        results = asyncio.run(load_phases(url, keys, files, job_ids, args, api))
        failed = {f"{name}, {shape}": dict(s.failures) for (name, shape), s in results.items() if s.failures}
        if failed:
            print(f"FAILED: non-2xx answers or errors: {failed}")
            ok = False

        # 3. Nothing lost, nothing twice; memory.
        created = args.jobs - sum(stats.failures.values())
        for shape in ("closed loop", "pollers"):
            posted = results[("POST /jobs", shape)]
            created += posted.count - sum(posted.failures.values())
        rows, queued = deployment.count_jobs(), deployment.queued_messages()
        print(f"all jobs: {created} created (2xx), {rows} job rows in PostgreSQL, {queued} messages in the queue")
        if not created == rows == queued:
            print("FAILED: every created job must have exactly one row and one queued message")
            ok = False
        print(f"API peak RSS (VmHWM): {peak_rss_mib(api):.0f} MiB; load average {load_average()} at the end")

        job, health = results[("GET /jobs/{id}", "pollers")], results[("GET /healthz (baseline)", "pollers")]
        job_closed, health_closed = (
            results[("GET /jobs/{id}", "closed loop")],
            results[("GET /healthz (baseline)", "closed loop")],
        )
        print(
            f"GET /jobs/{{id}} against GET /healthz, same server and run: API CPU per request "
            f"{job_closed.api_cpu / job_closed.count * 1000:.2f} ms against "
            f"{health_closed.api_cpu / health_closed.count * 1000:.2f} ms "
            f"({job_closed.api_cpu / job_closed.count / (health_closed.api_cpu / health_closed.count):.1f}x); "
            f"closed-loop throughput {job_closed.throughput:.0f} against {health_closed.throughput:.0f} req/s; "
            f"pollers p99 {job.percentile_ms(0.99):.1f} against {health.percentile_ms(0.99):.1f} ms"
        )
        met = job.percentile_ms(0.99) < TARGET_P99_MS and not job.failures
        print(
            f"target GET /jobs/{{id}} p99 < {TARGET_P99_MS:g} ms at {args.clients} clients: "
            f"{'met' if met else 'NOT met'} (pollers p99 {job.percentile_ms(0.99):.1f} ms)"
        )
        if not ok:
            print(f"API log, last lines other than 2xx answers:\n{deployment.api_problems()}")
        return ok
    except BaseException:
        print(deployment.api_log(), file=sys.stderr)
        raise
    finally:
        deployment.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients in the load phases (default 50)")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each load phase (default 8)")
    parser.add_argument(
        "--interval", type=float, default=0.5, help="seconds between two requests of one poller (default 0.5)"
    )
    parser.add_argument("--jobs", type=int, default=500, help="POST /jobs sent at once in the burst (default 500)")
    parser.add_argument(
        "--pg-admin",
        default=os.environ.get("TUNEFORGE_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="a PostgreSQL DSN allowed to create and drop databases (default: TUNEFORGE_TEST_PG_ADMIN or local)",
    )
    parser.add_argument(
        "--redis", default="redis://127.0.0.1:6379/12", help="Redis broker URL; only this run's keys are touched"
    )
    parser.add_argument(
        "--model-cache-dir",
        type=Path,
        default=None,
        help="converted base models (default: TUNEFORGE_MODEL_CACHE_DIR, else the default data dir's cache)",
    )
    args = parser.parse_args()
    args.model_cache_dir = (args.model_cache_dir or default_models_dir()).resolve()
    started = time.perf_counter()
    ok = run(args)
    print(f"total {time.perf_counter() - started:.0f} s")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
