"""What the benchmarks share of memory and child processes: peak memory, a guard that ends a child past a memory
limit, weights read in before memory is counted, and how a parent runs a child and the child hands back its result.

Standard library only: a measured child imports this before anything it measures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

RESULT_PREFIX = "RESULT "  # a child's last line starting with this carries its JSON result
MEMORY_LIMIT_STATUS = 3  # a child's exit status when the guard stopped it
# The child's environment: transformers' warnings and hub progress bars off, so that its stderr shows only what matters.
CHILD_ENVIRONMENT = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def rss_peak_mib() -> float:
    """This process's peak resident memory (`ru_maxrss`), in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def guard_memory(limit_gib: float) -> None:
    """End this process as soon as its resident memory passes the limit (polled every 10 ms); 0: no limit."""
    if not limit_gib:
        return
    limit_mib = limit_gib * 1024
    page_mib = os.sysconf("SC_PAGE_SIZE") / 2**20

    def watch() -> None:
        with open("/proc/self/statm") as statm:
            while True:
                statm.seek(0)
                if int(statm.read().split()[1]) * page_mib > limit_mib:
                    print(f"over the memory limit of {limit_mib:.0f} MiB: measurement stopped", file=sys.stderr)
                    os._exit(MEMORY_LIMIT_STATUS)
                time.sleep(0.01)

    threading.Thread(target=watch, daemon=True).start()


def touch_weights(model: Any) -> None:
    """Read every weight: a checkpoint loaded lazily (memory-mapped) counts as loaded memory, not as training's."""
    import torch

    with torch.no_grad():
        for param in model.parameters():
            param.sum()


def run_child(script: str, options: list[str], env: dict[str, str] | None = None) -> tuple[int, dict[str, Any] | None]:
    """Runs `script` again, with `options`, in a fresh process (its stderr passes through), under CHILD_ENVIRONMENT
    and `env`. Returns its exit status and the result of its last RESULT_PREFIX line (None when it printed none)."""
    command = [sys.executable, str(Path(script).resolve()), *options]
    environment = {**os.environ, **CHILD_ENVIRONMENT, **(env or {})}
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=environment)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    return done.returncode, dict(json.loads(lines[-1].removeprefix(RESULT_PREFIX))) if lines else None


def hand_back(result: dict[str, Any]) -> None:
    """In the child: print the result for `run_child` in the parent."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)
