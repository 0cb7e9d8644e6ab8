"""The `tuneforge` client commands, run as the real installed command (a new process each time) against a real
server on loopback: what a user types, what they see, and the exit codes scripts rely on."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from app.core.settings import Settings
from app.main import create_app
from tests.conftest import Tenant, free_port, jsonl
from tests.test_inference_api import live
from worker.runner import run_training_job

TUNEFORGE = Path(sys.prefix) / "bin" / "tuneforge"  # the console script, as installed
pytestmark = pytest.mark.e2e  # every test runs the installed `tuneforge` command in processes of its own
embedded = pytest.mark.parametrize("backend", ["embedded"], indirect=True)

PROMPT = "The secret word is"
GOOD_LINES = [json.dumps({"prompt": PROMPT, "completion": " plum"})] * 8
# 4 steps: 8 examples, batch 4, 2 epochs.
FAST = ["-H", "n_epochs=2", "-H", "batch_size=4", "-H", "learning_rate=0.05"]


def run(*args: str | Path, env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(TUNEFORGE), *map(str, args)], env=env, input=stdin, capture_output=True, text=True, timeout=120
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


def base_env(**extra: str) -> dict[str, str]:
    """This environment without TUNEFORGE_* (a developer's own key or URL) and COLUMNS: output into a pipe, as a
    script gets it (table rows never wrapped)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_") and k != "COLUMNS"}
    return {**env, **extra}


@dataclass
class Cli:
    url: str
    key: str

    @property
    def env(self) -> dict[str, str]:
        return base_env(TUNEFORGE_API_URL=self.url, TUNEFORGE_API_KEY=self.key)

    def __call__(self, *args: str | Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return run(*args, env=self.env, stdin=stdin)

    def ok(self, *args: str | Path) -> str:
        done = self(*args)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout

    def json(self, *args: str | Path) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [str(TUNEFORGE), *args], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )


@pytest.fixture
def tuneforge(settings: Settings, tenant: Tenant) -> Iterator[Cli]:
    with live(create_app(settings)) as url:
        yield Cli(url, tenant.key)


def write(path: Path, lines: list[str]) -> Path:
    path.write_bytes(jsonl(lines))
    return path


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=120)
    assert "Traceback" not in stderr, stderr
    return process.returncode, stdout, stderr


@pytest.mark.parametrize(
    ("devices", "said"),
    [
        ("x", "TUNEFORGE_WORKER_DEVICES='x' is neither a count (4) nor CUDA indices (0,1,2,3)"),
        ("0", "a worker owns at least 1 device"),
        ("0,0", "names a device twice"),
        ("0,1", "names CUDA devices, and this worker trains on the cpu; give a count instead"),
    ],
)
def test_a_worker_refuses_devices_it_cannot_own(tmp_path: Path, devices: str, said: str) -> None:
    done = run("worker", "--devices", devices, env=base_env(TUNEFORGE_DATA_DIR=str(tmp_path), TUNEFORGE_DEVICE="cpu"))
    assert done.returncode == 1 and said in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_version_is_the_installed_packages() -> None:
    started = time.monotonic()
    done = run("--version", env=base_env())
    assert (done.returncode, done.stdout) == (0, f"tuneforge {version('tuneforge')}\n")
    assert time.monotonic() - started < 10  # no torch on the way (about 0.3 s on an idle machine)


@embedded
def test_upload_reports_a_good_file_and_refuses_a_bad_one_line_by_line(tuneforge: Cli, tmp_path: Path) -> None:
    good = tuneforge("files", "upload", write(tmp_path / "good.jsonl", GOOD_LINES))
    assert good.returncode == 0, good.stderr
    file_id = good.stdout.strip()
    assert re.fullmatch(r"file-[0-9a-f]{24}", file_id), good.stdout  # the id alone: FILE=$(tuneforge files upload …)
    assert "validation report" in good.stderr and "prompt_completion" in good.stderr
    assert re.search(r"examples\s+8\b", good.stderr), good.stderr

    bad_lines = [GOOD_LINES[0], "{not json", json.dumps({"prompt": "no completion"}), GOOD_LINES[0]]
    bad = tuneforge("files", "upload", write(tmp_path / "bad.jsonl", bad_lines))
    assert bad.returncode == 1 and bad.stdout == ""
    rows = [line.split(maxsplit=2) for line in bad.stderr.splitlines() if re.match(r"\s*\d+\s+[a-z_]+\s\s", line)]
    assert [(row[0], row[1]) for row in rows] == [("2", "invalid_json"), ("3", "missing_field")], bad.stderr
    assert "2 bad line(s) of 4" in bad.stderr
    last = bad.stderr.rstrip().splitlines()[-1]
    assert last.startswith("error: line 2: ") and last.endswith("; nothing was stored (param: file)"), last

    listed = tuneforge.json("files", "list")
    assert [f["id"] for f in listed["data"]] == [file_id] and listed["has_more"] is False
    assert file_id in tuneforge.ok("files", "list")


@embedded
def test_the_whole_loop_upload_create_watch_download_generate(
    tuneforge: Cli, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every event stream ends after a second, as a dropped connection would: `jobs watch` must resume after the
    # last event it saw, and miss none and repeat none.
    import app.jobs.endpoints

    streams: list[int] = []

    def short_stream(db_url: str, job_id: str, after_seq: int, is_disconnected: Any, **kwargs: Any) -> Any:
        streams.append(after_seq)
        return original(db_url, job_id, after_seq, is_disconnected, max_seconds=1.0, **kwargs)

    original = app.jobs.endpoints.event_stream
    monkeypatch.setattr(app.jobs.endpoints, "event_stream", short_stream)

    file_id = tuneforge.ok("files", "upload", write(tmp_path / "train.jsonl", GOOD_LINES)).strip()
    create = ["jobs", "create", "--training-file", file_id, "--model", "tiny-random-llama", "--suffix", "plum"]
    create += [*FAST, "--hyperparameters", '{"target_modules": "all-linear", "n_epochs": 9}']
    plan = tuneforge.ok(*create, "--dry-run")
    assert re.search(r"steps\s+4 \(2 an epoch\)", plan) and "nothing was created" in plan, plan
    reserve = re.search(r"storage reserved\s+([\d,]+) bytes", plan)
    assert reserve, plan
    assert tuneforge.json("jobs", "list")["data"] == []  # the dry run created nothing

    job_id = tuneforge.ok(*create).strip()
    assert re.fullmatch(r"ftjob-[0-9a-f]{24}", job_id)
    job = tuneforge.json("jobs", "get", job_id)
    assert job["status"] == "queued" and job["reserved_bytes"] == int(reserve[1].replace(",", ""))
    # -H over --hyperparameters, each VALUE read as JSON when it is (2, 4, 0.05), else as a string.
    hyperparameters = job["hyperparameters"]
    assert (hyperparameters["n_epochs"], hyperparameters["batch_size"], hyperparameters["learning_rate"]) == (
        2,
        4,
        0.05,
    )
    assert hyperparameters["target_modules"] == "all-linear"

    watching = tuneforge.popen("jobs", "watch", job_id)
    as_lines = tuneforge.popen("jobs", "watch", job_id, "--json")
    deadline = time.monotonic() + 30
    while len(streams) < 4:  # both connected, both reconnected once while the job waits in the queue
        assert time.monotonic() < deadline, streams
        time.sleep(0.1)
    adapter_id = run_training_job(settings, job_id)
    assert adapter_id is not None

    code, stdout, stderr = finish(watching)
    assert (code, stdout) == (0, f"{adapter_id}\n"), stderr
    assert "4/4" in stderr and re.search(r"loss \d+\.\d{4}", stderr) and "ETA " in stderr, stderr
    assert f"training succeeded; adapter {adapter_id} published" in stderr

    code, stdout, stderr = finish(as_lines)
    assert code == 0, stderr
    watched = [json.loads(line) for line in stdout.splitlines()]
    logged = tuneforge.json("jobs", "events", job_id, "--limit", "1000")["data"]
    assert watched == logged  # every event once, in order, across the reconnections
    assert [e["seq"] for e in watched] == list(range(1, len(watched) + 1))
    assert [e["data"]["step"] for e in watched if e["type"] == "metrics"] == [1, 2, 3, 4]
    assert watched[-1]["data"] == {"status": "succeeded", "adapter_id": adapter_id}
    assert max(streams) > 0  # some stream started after an event it had already sent

    events_table = tuneforge.ok("jobs", "events", job_id, "--after", "2", "--limit", "2")
    assert re.search(r"^\s*3\s", events_table, re.M) and not re.search(r"^\s*[25]\s", events_table, re.M)
    assert "more with --after 4" in events_table
    [listed] = tuneforge.json("jobs", "list")["data"]
    assert (listed["id"], listed["status"], listed["adapter_id"]) == (job_id, "succeeded", adapter_id)
    assert re.search(
        rf"{job_id}\s+succeeded\s+tiny-random-llama\s+lora\s+4/4\s+{adapter_id}", tuneforge.ok("jobs", "list")
    )
    assert re.search(rf"adapter\s+{adapter_id}", tuneforge.ok("jobs", "get", job_id))

    # The adapter: listed, downloaded as a tar.gz that holds the PEFT files, listed as a model.
    [adapter] = tuneforge.json("adapters", "list")["data"]
    assert (adapter["id"], adapter["name"]) == (adapter_id, "tiny-random-llama:plum")
    assert adapter_id in tuneforge.ok("adapters", "list")
    downloaded = tuneforge("adapters", "download", adapter_id, "--output", tmp_path)
    assert downloaded.returncode == 0, downloaded.stderr
    archive = tmp_path / f"{adapter_id}.tar.gz"
    assert downloaded.stdout == f"{archive}\n" and f"sha256 {adapter['sha256']} (checked)" in downloaded.stderr
    with tarfile.open(archive) as tar:
        names = {Path(name).name for name in tar.getnames()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tuneforge.json"} <= names
    nowhere = tuneforge("adapters", "download", adapter_id, "--output", tmp_path / "missing" / "a.tar.gz")
    assert nowhere.returncode == 1 and nowhere.stderr.startswith("error: No such file or directory"), nowhere
    assert "Traceback" not in nowhere.stderr and len(nowhere.stderr.splitlines()) == 1

    models = {m["id"]: m for m in tuneforge.json("models", "list")["data"]}
    assert models[adapter_id]["parent"] == "tiny-random-llama" and models["tiny-random-llama"]["default"]
    table = tuneforge.ok("models", "list")
    assert "tiny-random-llama (default)" in table and re.search(rf"{adapter_id}\s+tiny-random-llama:plum", table)

    # Generation: streamed text is the text the API gives whole; the token counts go to stderr.
    ask = ["generate", PROMPT, "--adapter", adapter_id, "--temperature", "0", "--max-tokens", "6"]
    whole = tuneforge.json(*ask)
    streamed = tuneforge(*ask)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == whole["text"] + "\n" and whole["text"].startswith(" plum")
    usage = whole["usage"]
    assert f"[length: {usage['prompt_tokens']} prompt + 6 completion tokens]" in streamed.stderr
    chat = tuneforge("generate", "-", "--chat", "--temperature", "0", "--max-tokens", "4", stdin="Hello")
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr


def create_job(tuneforge: Cli, tmp_path: Path, lines: list[str], *hyperparameters: str) -> str:
    file_id = tuneforge.ok("files", "upload", write(tmp_path / f"{len(lines)}.jsonl", lines)).strip()
    return tuneforge.ok("jobs", "create", "--training-file", file_id, *hyperparameters).strip()


@embedded
def test_a_failed_or_cancelled_job_ends_the_watch_with_its_reason(
    tuneforge: Cli, settings: Settings, tmp_path: Path
) -> None:
    too_long = [json.dumps({"prompt": "word " * 40, "completion": " end"})] * 2
    failing = create_job(tuneforge, tmp_path, too_long, "-H", "max_seq_length=16")
    assert run_training_job(settings, failing) is None
    watched = tuneforge("jobs", "watch", failing)
    assert watched.returncode == 1 and watched.stdout == ""
    last = watched.stderr.rstrip().splitlines()[-1]
    assert last.startswith(f"error: job {failing} failed: the training file has no example with a completion "), last

    queued = create_job(tuneforge, tmp_path, GOOD_LINES)
    # A queued job pauses at once and resumes to the queue; resuming it again is refused with a clear line.
    assert tuneforge.ok("jobs", "pause", queued) == f"job {queued}: paused\n"
    assert tuneforge.json("jobs", "resume", queued)["status"] == "queued"
    refused = tuneforge("jobs", "resume", queued)
    assert refused.returncode == 1 and refused.stderr.startswith("error: ") and "only a paused job" in refused.stderr
    assert tuneforge.ok("jobs", "cancel", queued) == f"job {queued}: cancelled\n"
    watched = tuneforge("jobs", "watch", queued, "--json")
    assert watched.returncode == 1 and f"error: job {queued} was cancelled" in watched.stderr
    assert json.loads(watched.stdout.splitlines()[-1])["data"] == {"status": "cancelled"}
    again = tuneforge("jobs", "cancel", queued)
    assert again.returncode == 1 and again.stderr.startswith("error: ") and "cancelled" in again.stderr


@embedded
def test_errors_are_one_clear_line_and_an_exit_code(tuneforge: Cli, settings: Settings, tmp_path: Path) -> None:
    refused = run("files", "list", env={**tuneforge.env, "TUNEFORGE_API_KEY": "tf_not-a-key"})
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.startswith("error: the API key was refused (invalid API key); check --api-key"), refused

    nobody = f"http://127.0.0.1:{free_port()}"
    unreachable = run("jobs", "list", "--api-url", nobody, env=tuneforge.env)
    assert (unreachable.returncode, unreachable.stderr) == (
        1,
        f"error: cannot reach the Tuneforge API at {nobody} (set --api-url or TUNEFORGE_API_URL)\n",
    )

    elsewhere = run("files", "list", "--api-url", f"{tuneforge.url}/v1", env=tuneforge.env)  # not the API's root
    assert elsewhere.returncode == 1 and f"{tuneforge.url}/v1 has no such route" in elsewhere.stderr, elsewhere

    keyless = run("jobs", "list", env=base_env(TUNEFORGE_API_URL=tuneforge.url))
    assert keyless.returncode == 2 and keyless.stderr.startswith("error: no API key: pass --api-key or set"), keyless

    missing = tuneforge("jobs", "get", "ftjob-nope")
    assert missing.returncode == 1 and missing.stderr.startswith("error: ") and "ftjob-nope" in missing.stderr
    no_adapter = tuneforge("generate", "hi", "--adapter", "adapter-nope")
    assert no_adapter.returncode == 1 and "adapter-nope" in no_adapter.stderr, no_adapter.stderr

    usage = tuneforge("jobs", "create")
    assert usage.returncode == 2 and "--training-file" in usage.stderr
    bad_pair = tuneforge("jobs", "create", "--training-file", "file-x", "-H", "n_epochs")
    assert bad_pair.returncode == 2 and "'n_epochs' is not KEY=VALUE" in bad_pair.stderr
    no_file = tuneforge("jobs", "create", "--training-file", "file-nope")
    assert no_file.returncode == 1 and "file-nope" in no_file.stderr  # the API's answer, naming the file


@embedded
def test_admin_commands_say_which_database_a_key_is_written_to(
    tuneforge: Cli, settings: Settings, tmp_path: Path
) -> None:
    """A key created on another data dir than the server's is refused: the command said where it wrote it."""
    other = tmp_path / "elsewhere"
    created = run("keys", "create", "--tenant", "lost", env=base_env(TUNEFORGE_DATA_DIR=str(other)))
    assert created.returncode == 0, created.stderr
    assert f"database: SQLite {other.resolve() / 'tuneforge.db'}" in created.stderr
    refused = run("files", "list", env={**tuneforge.env, "TUNEFORGE_API_KEY": created.stdout.strip()})
    assert refused.returncode == 1 and "`tuneforge keys create` wrote it to" in refused.stderr

    here = run("keys", "create", "--tenant", "found", env=base_env(TUNEFORGE_DATABASE_URL=settings.db_url))
    database = Path(settings.db_url.removeprefix("sqlite:///")).resolve()
    assert here.returncode == 0 and f"database: SQLite {database}" in here.stderr
    assert run("files", "list", env={**tuneforge.env, "TUNEFORGE_API_KEY": here.stdout.strip()}).returncode == 0

    secret = "postgresql+psycopg://tuneforge:hunter2@127.0.0.1:1/tuneforge"
    masked = subprocess.run(
        [str(TUNEFORGE), "keys", "create", "--tenant", "x"],
        env=base_env(TUNEFORGE_DATABASE_URL=secret),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "database: postgresql+psycopg://tuneforge:***@127.0.0.1:1/tuneforge" in masked.stderr
    assert "hunter2" not in masked.stderr and masked.returncode != 0


# The admin listing of base models stays reachable without a key or a server.
@embedded
def test_models_list_local_reads_the_database_without_a_key(settings: Settings) -> None:
    env = base_env(TUNEFORGE_DATA_DIR=str(settings.data_dir), TUNEFORGE_DEFAULT_BASE_MODEL="tiny-random-llama")
    local = run("models", "list", "--local", "--json", env=env)
    assert local.returncode == 0, local.stderr
    assert "tiny-random-llama" in {m["id"] for m in json.loads(local.stdout)}
    assert "tiny-random-llama (default)" in run("models", "list", "--local", env=env).stdout


@embedded
def test_delete_commands_free_an_adapter_and_an_ended_job(tuneforge: Cli, settings: Settings, tmp_path: Path) -> None:
    job_id = create_job(tuneforge, tmp_path, GOOD_LINES, *FAST)
    refused = tuneforge("jobs", "delete", job_id)
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.startswith(f"error: job {job_id} is queued: only a job that has ended can be deleted")
    adapter_id = run_training_job(settings, job_id)
    assert adapter_id is not None

    assert tuneforge.ok("adapters", "delete", adapter_id) == f"adapter {adapter_id}: deleted\n"
    assert tuneforge.json("adapters", "list")["data"] == []
    again = tuneforge("adapters", "delete", adapter_id)
    assert again.returncode == 1 and again.stderr.startswith(f"error: no adapter with id '{adapter_id}'")

    assert tuneforge.json("jobs", "delete", job_id) == {"id": job_id, "object": "fine_tuning.job", "deleted": True}
    assert tuneforge.json("jobs", "list")["data"] == []
    gone = tuneforge("jobs", "get", job_id)
    assert gone.returncode == 1 and gone.stderr.startswith(f"error: no job with id '{job_id}'")


@embedded
def test_jobs_create_takes_the_dpo_objective(tuneforge: Cli, tmp_path: Path) -> None:
    pair = {
        "input": {"messages": [{"role": "user", "content": "Pick a colour."}]},
        "preferred_output": [{"role": "assistant", "content": "Blue."}],
        "non_preferred_output": [{"role": "assistant", "content": "Red."}],
    }
    file_id = tuneforge.ok("files", "upload", write(tmp_path / "prefs.jsonl", [json.dumps(pair)] * 4)).strip()
    common = ("jobs", "create", "--training-file", file_id, "--model", "tiny-random-llama", "--dry-run")
    plan = tuneforge.json(*common, "--objective", "dpo", "-H", "beta=0.2")
    assert plan["hyperparameters"]["objective"] == "dpo" and plan["hyperparameters"]["beta"] == 0.2
    refused = tuneforge(*common)  # a supervised job on a preference file
    assert refused.returncode == 1 and "error: training_file: " in refused.stderr, refused.stderr
    assert 'preference lines need "objective": "dpo"' in refused.stderr
