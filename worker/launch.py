"""A job on several devices: the worker that claimed it starts its ranks under `torchrun`, one per device, and
waits for them.

- `torchrun --standalone` (PyTorch's elastic launcher, c10d rendezvous on a free local port) starts
  `python -m worker.ranks`, with `--max-restarts 0`: when a rank dies, torchrun stops the others, and the worker
  decides what happens to the job.
- Rank 0 runs the job as a one-device job runs (worker/runner.py `run_to_an_outcome`): events, metrics,
  checkpoints, the adapter, the job's last state. It writes how the run ended to a file the worker reads. The
  other ranks compute and never touch the database.
- The worker keeps the job's heartbeat (worker/runner.py) while the ranks run. Its stop (Ctrl-C, SIGTERM) reaches
  rank 0 through a file that rank 0 watches: the ranks checkpoint after the current step and the job goes back to
  the queue, as a one-device job does. Cancel and pause go through the job's row, as always.
- A rank that dies (kill -9, out of memory) leaves no outcome: the attempt counts as a lost worker and the job
  goes back to the queue, to resume from its latest checkpoint (or fails, after `max_job_attempts`).
- Torchrun and the ranks die with the worker (the parent-death signal), so a worker killed outright leaves none
  running; its job's heartbeat stops and the reaper re-queues it.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from app.core.settings import Settings
from app.jobs.state import ClaimedJob
from app.ml.device import WorkerDevices
from app.ml.training import TrainingError
from worker.lifecycle import JobAttempt, stop_requested
from worker.runner import JobOutcome, base_model_of, send_again

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
STOP_GRACE_SECONDS = 30  # after the worker's own end: what torchrun and its ranks get before they are killed
PR_SET_PDEATHSIG = 1


def run_ranks(settings: Settings, attempt: JobAttempt) -> JobOutcome:
    """Run the claimed job's ranks to their end; the outcome rank 0 reported, or the attempt's end when a rank
    died without one."""
    job = attempt.job
    owned = WorkerDevices.parse(settings.worker_devices).count
    if job.devices > owned:  # the queues route no such job here; a message moved by hand could
        return _lost(settings, attempt, f"the worker that took the job owns {owned} devices, not {job.devices}")
    settings.tmp_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"ranks-{job.id}-", dir=settings.tmp_dir) as tmp:
        folder = Path(tmp)
        spec = folder / "job.json"
        outcome_file, stop_file = folder / "outcome.json", folder / "stop"
        spec.write_text(
            json.dumps(
                {
                    "job": dataclasses.asdict(job),
                    "outcome": str(outcome_file),
                    "stop_file": str(stop_file),
                    "n_parameters": base_model_parameters(settings, job),  # whether to shard it
                }
            )
        )
        command = torchrun_command(job.devices, spec)
        log.info("job %s: starting %d ranks under torchrun", job.id, job.devices)
        process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            command, env=rank_environment(settings, job.devices), start_new_session=True, preexec_fn=die_with_parent
        )
        try:
            while process.poll() is None:
                if stop_requested() and not stop_file.exists():
                    stop_file.touch()  # rank 0 sees it at the next step: checkpoint, hand back
                time.sleep(POLL_SECONDS)
        except BaseException:  # a cold shutdown of the worker: the ranks go with it
            stop(process)
            raise
        reported = _read_outcome(outcome_file)
    if reported is not None:
        return reported
    return _lost(
        settings,
        attempt,
        f"one of the job's {job.devices} processes stopped (torchrun's exit code {process.returncode})",
    )


def base_model_parameters(settings: Settings, job: ClaimedJob) -> int:
    """The base model's parameter count (0 if it changed or is gone: rank 0 fails the job saying so)."""
    try:
        return base_model_of(settings, job).n_parameters
    except TrainingError:
        return 0


def torchrun_command(ranks: int, spec: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # one machine: the rendezvous on a free port of this host, gone with the run
        f"--nproc-per-node={ranks}",
        "--max-restarts=0",  # a rank that dies ends the attempt: the job resumes from its checkpoint instead
        "--monitor-interval=0.5",
        "-m",
        "worker.ranks",
        str(spec),
    ]


def rank_environment(settings: Settings, ranks: int) -> dict[str, str]:
    """The worker's environment, with each rank's share of the CPU's threads (torchrun would set 1)."""
    threads = max(1, (settings.torch_threads or os.cpu_count() or 1) // ranks)
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "TUNEFORGE_TORCH_THREADS": str(threads)}


def die_with_parent() -> None:
    """In a child, before it runs: SIGTERM when the process that started it dies (Linux), however it dies."""
    # Not Linux: the ranks outlive a worker killed outright, until their next collective fails.
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def stop(process: subprocess.Popen[bytes]) -> None:
    """torchrun asked to stop (it stops its ranks), then killed with them if it has not within the grace time."""
    try:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def _read_outcome(path: Path) -> JobOutcome | None:
    try:
        fields: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return JobOutcome(**fields, logged=True)


def _lost(settings: Settings, attempt: JobAttempt, why: str) -> JobOutcome:
    job = attempt.job
    log.warning("job %s: %s", job.id, why)
    if not attempt.lose(why):
        if attempt.has_ended():
            return JobOutcome("failed", f"{why}; the job lost too many workers", error_code="worker_lost")
        return JobOutcome("left_to_reaper", f"{why}, and the job is no longer this run's")
    return send_again(settings, attempt, why)
