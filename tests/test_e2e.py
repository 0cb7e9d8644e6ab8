"""The whole loop over HTTP against real processes: `tuneforge up` (embedded) and `tuneforge api` +
`tuneforge worker` on PostgreSQL + Redis + S3. The downloaded adapter, loaded with PEFT offline, must
generate exactly what /generate returns."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import S3_BUCKET, S3_KEY, S3Endpoint, free_port

pytestmark = pytest.mark.e2e
TUNEFORGE = [sys.executable, "-m", "app.cli"]


@dataclass
class Service:
    url: str
    key: str
    logs: list[Path]
    env: dict[str, str]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def dump_logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-6000:]}" for p in self.logs if p.exists())


def first_key(up_stdout_line: str, data_dir: Path) -> str:
    """The first tenant's key from `tuneforge up` whose stdout is not a terminal (a pipe, as in a container): the
    line names the file it is in (mode 0600), never the key itself."""
    assert "tf_" not in up_stdout_line, up_stdout_line
    key_file = data_dir.resolve() / "first-api-key"
    assert f"Its API key is in {key_file} " in up_stdout_line, up_stdout_line
    assert key_file.stat().st_mode & 0o777 == 0o600
    key = key_file.read_text().strip()
    assert re.fullmatch(r"tf_\S+", key), key
    return key


def wait_healthy(url: str, procs: list[subprocess.Popen[bytes]], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            assert proc.poll() is None, f"a process exited early with {proc.returncode}"
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError("service did not become healthy")


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 60) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


@pytest.fixture(params=["embedded", "production"])
def service(request: pytest.FixtureRequest, tmp_path: Path, model_cache_dir: Path) -> Iterator[Service]:
    port = free_port()
    env = {
        **os.environ,
        "TUNEFORGE_DATA_DIR": str(tmp_path / "data"),
        "TUNEFORGE_MODEL_CACHE_DIR": str(model_cache_dir),
        "TUNEFORGE_PORT": str(port),
        "PYTHONUNBUFFERED": "1",
    }
    url = f"http://127.0.0.1:{port}"
    if request.param == "embedded":
        log = tmp_path / "up.log"
        with log.open("wb") as out:
            up = subprocess.Popen([*TUNEFORGE, "up"], env=env, stdout=subprocess.PIPE, stderr=out)
        assert up.stdout is not None
        key = first_key(up.stdout.readline().decode(), tmp_path / "data")
        svc = Service(url, key, [log], env)
        try:
            wait_healthy(url, [up])
            yield svc
        except BaseException:
            print(svc.dump_logs())
            raise
        finally:
            # Ctrl-C: `up` stops the API and the worker and exits cleanly.
            assert stop(up, signal.SIGINT) == 0, svc.dump_logs()
        return

    pg_url = request.getfixturevalue("pg_url")
    redis_url = request.getfixturevalue("redis_url")
    s3: S3Endpoint = request.getfixturevalue("s3")
    env.update(
        TUNEFORGE_DATABASE_URL=pg_url,
        TUNEFORGE_BROKER_URL=redis_url,
        TUNEFORGE_STORAGE_URL=f"s3://{S3_BUCKET}/e2e-{port}",
        TUNEFORGE_S3_ENDPOINT_URL=s3.url,
        TUNEFORGE_S3_ACCESS_KEY_ID=S3_KEY,
        TUNEFORGE_S3_SECRET_ACCESS_KEY=S3_KEY,
        TUNEFORGE_QUEUE_NAME=f"e2e-{port}",
        TUNEFORGE_REAPER_SECONDS="0",  # the database is shared with other tests: their jobs are not ours
    )
    subprocess.run([*TUNEFORGE, "migrate"], env=env, check=True, capture_output=True)
    keys = subprocess.run(
        [*TUNEFORGE, "keys", "create", "--tenant", f"e2e-{port}"], env=env, check=True, capture_output=True
    )
    stdout_lines = keys.stdout.decode().splitlines()
    assert len(stdout_lines) == 1 and stdout_lines[0].startswith("tf_"), keys.stdout
    logs = [tmp_path / "api.log", tmp_path / "worker.log"]
    with logs[0].open("wb") as a, logs[1].open("wb") as w:
        api = subprocess.Popen([*TUNEFORGE, "api"], env=env, stdout=a, stderr=subprocess.STDOUT)
        worker = subprocess.Popen([*TUNEFORGE, "worker"], env=env, stdout=w, stderr=subprocess.STDOUT)
    svc = Service(url, stdout_lines[0], logs, env)
    try:
        wait_healthy(url, [api, worker])
        yield svc
    except BaseException:
        print(svc.dump_logs())
        raise
    finally:
        stop(api)
        stop(worker)


PROMPT = "The secret word is"


def test_the_whole_loop(service: Service, tmp_path: Path) -> None:
    """A model folder the user made (a tiny Qwen2 with its own tokenizer) is registered with the real CLI while
    the service runs, then goes through the whole loop."""
    from tests.model_factories import build_tiny_model

    base_dir = build_tiny_model("qwen2", tmp_path / "my-model")
    added = subprocess.run(
        [*TUNEFORGE, "models", "add", "my-qwen", "--path", str(base_dir)], env=service.env, capture_output=True
    )
    assert added.returncode == 0, added.stderr.decode()
    http = httpx.Client(base_url=service.url, headers=service.headers, timeout=120)
    assert "my-qwen" in [m["id"] for m in http.get("/v1/models").json()["data"]]
    lines = [json.dumps({"prompt": PROMPT, "completion": " plum"})] * 8
    r = http.post(
        "/v1/files",
        files={"file": ("train.jsonl", "\n".join(lines))},
        data={"purpose": "fine-tune", "base_model": "my-qwen"},
    )
    assert r.status_code == 201, r.text
    assert r.json()["tokenizer_model"] == "my-qwen"
    file_id = r.json()["id"]

    r = http.post(
        "/jobs",
        json={
            "base_model": "my-qwen",
            "method": "lora",
            "training_file": file_id,
            "validation_file": file_id,
            "hyperparameters": {"n_epochs": 8, "learning_rate": 0.05, "target_modules": "all-linear"},
        },
    )
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]

    deadline = time.monotonic() + 300
    seen: set[str] = set()
    while True:
        job = http.get(f"/jobs/{job_id}").json()
        seen.add(job["status"])
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        assert time.monotonic() < deadline, service.dump_logs()
        time.sleep(0.5)
    assert job["status"] == "succeeded", (job, service.dump_logs())
    assert job["metrics"]["valid_loss"] < 10  # from about 12 for the random model
    assert job["progress"] == {"step": 16, "total_steps": 16, "epoch": 8}
    statuses = [
        e["data"]["status"]
        for e in http.get(f"/jobs/{job_id}/events?limit=1000").json()["data"]
        if e["type"] == "status"
    ]
    assert statuses == ["validating_files", "queued", "running", "succeeded"]

    adapter_id = job["adapter_id"]
    archive = http.get(f"/adapters/{adapter_id}/download")
    assert archive.status_code == 200
    folder = tmp_path / "adapter"
    with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
        tar.extractall(folder, filter="data")

    # Offline: the ecosystem's own loader on the base checkpoint and the downloaded adapter.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), folder).eval()
    ids = tokenizer(PROMPT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(
            ids,
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    offline = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    r = http.post("/generate", json={"adapter_id": adapter_id, "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["text"] == offline
    assert offline.startswith(" plum")

    base = http.post(
        "/generate", json={"base_model": "my-qwen", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    ).json()
    assert base["text"] != offline


def test_ctrl_c_during_training_hands_the_job_back_and_the_next_start_finishes_it(
    tmp_path: Path, model_cache_dir: Path
) -> None:
    """`tuneforge up` stopped mid-job: both processes exit at once, the job is checkpointed at the step it was
    on and back in the queue (never left `running`, never failed); started again, `up` resumes and finishes it."""
    STEPS = 120  # noqa: N806
    port = free_port()
    env = {
        **os.environ,
        "TUNEFORGE_DATA_DIR": str(tmp_path / "data"),
        "TUNEFORGE_MODEL_CACHE_DIR": str(model_cache_dir),
        "TUNEFORGE_PORT": str(port),
    }
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        up = subprocess.Popen([*TUNEFORGE, "up"], env=env, stdout=subprocess.PIPE, stderr=out)
    assert up.stdout is not None
    key = first_key(up.stdout.readline().decode(), tmp_path / "data")
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    try:
        wait_healthy(url, [up])
        lines = [json.dumps({"prompt": PROMPT, "completion": " plum"})] * 24
        file_id = http.post("/v1/files", files={"file": ("t.jsonl", "\n".join(lines))}).json()["id"]
        # 120 steps (about a second on an idle machine: the tiny model trains 48 in half a second), stopped after
        # the third
        job_id = http.post(
            "/jobs",
            json={
                "base_model": "tiny-random-llama",
                "training_file": file_id,
                "hyperparameters": {"n_epochs": STEPS // len(lines), "batch_size": 1},
            },
        ).json()["id"]
        deadline = time.monotonic() + 120
        while http.get(f"/jobs/{job_id}").json()["progress"]["step"] < 3:
            assert time.monotonic() < deadline, log.read_text()[-5000:]
            time.sleep(0.1)
    finally:
        started = time.monotonic()
        assert stop(up, signal.SIGINT, timeout=60) == 0, log.read_text()[-5000:]
    assert time.monotonic() - started < 45

    with log.open("ab") as out:
        up = subprocess.Popen([*TUNEFORGE, "up"], env=env, stdout=out, stderr=out)
    try:
        wait_healthy(url, [up])
        events = http.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
        handed_back = [e for e in events if e["message"].startswith("the worker was stopped at step")]
        assert len(handed_back) == 1 and handed_back[0]["data"]["status"] == "queued", events
        stopped_at = handed_back[0]["data"]["step"]
        assert 3 <= stopped_at < STEPS
        deadline = time.monotonic() + 120
        while (job := http.get(f"/jobs/{job_id}").json())["status"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, log.read_text()[-5000:]
            time.sleep(0.2)
        assert job["status"] == "succeeded" and job["attempt"] == 2, job
        events = http.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
        assert [e["data"]["step"] for e in events if e["type"] == "metrics"] == list(range(1, STEPS + 1))
        assert "attempt 2: resumed from checkpoint" in " ".join(e["message"] for e in events)
    finally:
        assert stop(up, signal.SIGINT, timeout=60) == 0, log.read_text()[-5000:]
