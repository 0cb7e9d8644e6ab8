"""What the benchmarks share: their common options, Tuneforge's own set-up as the service configures it (settings,
placement, threads, serving limits), the recipe's reporter, and what a run says about its machine and software."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.core.settings import Settings
from app.ml.device import Placement, resolve_placement
from app.ml.models import BUILTINS, ModelStore

if TYPE_CHECKING:
    from app.ml.serving import EngineLimits

DEFAULT_MODEL = "smollm2-135m-instruct"

# The options several benchmarks take, each with one meaning and one help text; `add_options` adds them by name.
OPTIONS: dict[str, dict[str, Any]] = {
    "--model": {"default": DEFAULT_MODEL, "choices": sorted(BUILTINS), "help": "built-in base model id"},
    "--models-dir": {
        "type": Path,
        "default": None,
        "help": "converted-model cache (default: Settings().models_dir, where the registry converts the model once)",
    },
    "--device": {"default": "auto", "help": "auto, cpu, cuda, cuda:N or mps (as TUNEFORGE_DEVICE)"},
    "--dtype": {"default": "auto", "help": "auto, float32, bfloat16 or float16 (as TUNEFORGE_DTYPE)"},
    "--threads": {"type": int, "default": None, "help": "torch threads (default: torch's)"},
}


def add_options(parser: argparse.ArgumentParser, *names: str) -> None:
    """Adds the shared options `names` (keys of OPTIONS), in that order: --help lists them where they are added."""
    for name in names:
        parser.add_argument(name, **OPTIONS[name])


def add_memory_limit_option(parser: argparse.ArgumentParser, default_gib: float) -> None:
    """--memory-limit-gib, for the scripts that measure in child processes under `process_memory.guard_memory`."""
    parser.add_argument(
        "--memory-limit-gib",
        type=float,
        default=default_gib,
        help="stop a measurement whose process goes over this resident memory, in GiB; 0: no limit "
        f"(default: {default_gib:g})",
    )


def parse_options(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The parsed command line, with --models-dir (where the script takes it) defaulting to `default_models_dir()`."""
    args = parser.parse_args()
    if "models_dir" in vars(args) and args.models_dir is None:
        args.models_dir = default_models_dir()
    return args


def shared_options(args: argparse.Namespace) -> list[str]:
    """The shared options of `args` (and --memory-limit-gib) as a command line, for a child process of the script."""
    given = vars(args)
    keys = ("model", "models_dir", "device", "dtype", "memory_limit_gib")
    forwarded = [f"--{key.replace('_', '-')}={given[key]}" for key in keys if key in given]
    if given.get("threads"):  # left out, the child keeps torch's own number as the parent did
        forwarded.append(f"--threads={args.threads}")
    return forwarded


def default_models_dir() -> Path:
    """The converted-model cache of the default data dir: every benchmark reuses the models converted there."""
    return Settings().models_dir


def convert_once(models_dir: Path, model_id: str) -> None:
    """Converts the model into the cache now, in the parent process, so that no measured process pays for it."""
    ModelStore(models_dir, None).model_dir(BUILTINS[model_id])


def bench_settings(data_dir: Path, args: argparse.Namespace) -> Settings:
    """The service's settings for a run in `data_dir`, with the options' device, dtype and threads, and the
    converted-model cache of --models-dir where the script takes it, else `default_models_dir()`."""
    return Settings(
        data_dir=data_dir,
        model_cache_dir=vars(args).get("models_dir") or default_models_dir(),
        device=args.device,
        dtype=args.dtype,
        torch_threads=args.threads,
    )


def set_threads(threads: int | None) -> None:
    """torch's intra-op threads as --threads asks; torch's own number when it is not given."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def torch_placement(args: argparse.Namespace) -> Placement:
    """Sets torch's threads (--threads), then resolves the placement (--device, --dtype): a CPU placement names the
    threads it runs on, so they are set first."""
    set_threads(args.threads)
    return resolve_placement(args.device, args.dtype)


def serving_limits(**changes: Any) -> EngineLimits:
    """The serving engine's bounds as the service's settings give them (TUNEFORGE_SERVING_*), with `changes`."""
    from app.inference.engine import engine_limits  # the API's stack: imported only by the scripts that serve

    return dataclasses.replace(engine_limits(Settings()), **changes)


@dataclass
class BenchReporter:
    """The recipe's Reporter (app.ml.training): keeps what the recipe reports. It prints, as `  [label] message` on
    stderr, what is not at info level, and when `verbose` also the recipe's log lines, its placement and every 10th
    step (and each evaluation)."""

    label: str
    verbose: bool = False
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def event(self, type_: str, message: str, data: dict[str, Any] | None = None, level: str = "info") -> None:
        self.events.append((type_, data or {}))
        if level != "info" or (self.verbose and type_ == "log"):
            self._print(message)

    def placement(self, placement: Any) -> None:
        if self.verbose:
            self._print(f"training on {placement.describe()}")

    def progress(
        self, *, step: int, total_steps: int, epoch: int, metrics: dict[str, Any], message: str, type_: str = "metrics"
    ) -> None:
        self.events.append((type_, {"step": step, "epoch": epoch, **metrics}))
        if self.verbose and (type_ != "metrics" or step % 10 == 0 or step == total_steps):
            self._print(message)

    def check_cancelled(self) -> None:
        pass

    def of_type(self, type_: str) -> list[dict[str, Any]]:
        return [data for kind, data in self.events if kind == type_]

    def _print(self, message: str) -> None:
        print(f"  [{self.label}] {message}", file=sys.stderr, flush=True)


# --- what a run was measured on -----------------------------------------------------------------------------------
def environment(placement: Placement) -> dict[str, Any]:
    """torch's version and threads, and the placement: what every benchmark prints beside its figures (as JSON, so that
    a child process can hand it to its parent)."""
    import torch

    return {
        "placement": placement.describe(),
        "device": placement.device_str,
        "dtype": placement.dtype_str,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def library_versions() -> str:
    import peft
    import torch
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"


def cpu_name() -> str:
    """The CPU's architecture and model name, e.g. `x86_64 (AMD EPYC 7B13)`."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return f"{platform.machine()} ({line.split(':', 1)[1].strip()})"
    return platform.machine() or platform.processor() or "unknown CPU"


def load_average() -> str:
    """The load average over 1, 5 and 15 minutes, e.g. `1.1/1.4/1.4`: a busy machine slows every figure."""
    with contextlib.suppress(OSError):
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    return "?"


def command_line() -> str:
    """This run's command line, the interpreter relative to the working directory: what to paste beside figures."""
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(Path.cwd())
    return shlex.join([str(python), *sys.argv])


def wait_ready(url: str, process: Any, log: Callable[[], str], timeout: float = 120.0) -> None:
    """Until the API process at `url` answers /readyz with 200; RuntimeError with the end of its log (`log()`) if
    it exits first or is not ready within `timeout` seconds (then it is killed)."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the API exited with {process.returncode}:\n{log()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the API did not become ready:\n{log()}")
        time.sleep(0.3)


def tuneforge_command() -> list[str]:
    """The `tuneforge` command of this interpreter's environment (`python -m app.cli` where it has no script)."""
    script = Path(sys.executable).parent / "tuneforge"
    return [str(script)] if script.exists() else [sys.executable, "-m", "app.cli"]


@contextlib.contextmanager
def tuneforge_up(
    data_dir: Path, env: dict[str, str], *, show_log: bool = True
) -> Iterator[tuple[str, float, subprocess.Popen[bytes]]]:
    """`tuneforge up` in `data_dir` (TUNEFORGE_DATA_DIR), with this process's environment and `env` over it, on a
    free loopback port: its URL, how long it took to be ready and its process. Stopped (SIGTERM: it stops its API
    and worker) when the block ends; the end of its log printed on stderr then (without `show_log`, only when the
    block raised)."""
    import socket
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = data_dir / "up.log"
    started = time.monotonic()
    with log_path.open("wb") as log:
        up = subprocess.Popen(
            [*tuneforge_command(), "up", "--port", str(port), "--no-show-key"],
            env={**os.environ, "TUNEFORGE_DATA_DIR": str(data_dir), **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    failed = True
    try:
        wait_ready(url, up, lambda: log_path.read_text(errors="replace")[-3000:], timeout=120)
        yield url, time.monotonic() - started, up
        failed = False
    finally:
        up.terminate()
        try:
            up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()  # its API and worker are in the caller's process group
        if show_log or failed:
            tail = log_path.read_text(errors="replace")[-20000:]
            print(f"--- tuneforge up's log ---\n{tail}", file=sys.stderr, flush=True)
