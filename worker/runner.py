"""Run one training job end to end: claim it, train (resuming from its latest checkpoint), publish the adapter,
record the outcome.

Whatever happens inside, the job leaves `running`: succeeded, failed with a readable error, cancelled by the
user, or back in the queue when the worker is stopped. Only a worker that dies outright (kill -9, a lost
machine) or loses the database for longer than `db_retry_seconds` leaves it running, and then its heartbeat
stops and the reaper re-queues it.
"""

from __future__ import annotations

import contextlib
import logging
import resource
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from sqlalchemy.exc import InterfaceError, OperationalError

from app.core.db import session_scope
from app.core.error_codes import ErrorCode
from app.core.errors import DATABASE_ERRORS
from app.core.ids import new_id
from app.core.logging import job_logging_context
from app.core.models import Adapter
from app.core.settings import Settings
from app.core.storage import ObjectStorage
from app.jobs import state
from app.jobs.state import ClaimedJob, JobCancelled, JobLost
from app.ml.models import ModelRecord
from app.ml.objectives import init_from
from app.ml.training import StopRequested, TrainingError
from app.ml.training.memory import release_device_memory
from app.ml.training.parallel import ONE_PROCESS, OneProcess
from app.models.repository import find_model
from worker import lifecycle
from worker.checkpoints import CheckpointUnreadable, JobCheckpoints, store_artifact
from worker.lifecycle import Heartbeat, JobAttempt, JobReporter, stop_requested
from worker.training import job_recipe, starting_weights

log = logging.getLogger(__name__)

FILE_UNAVAILABLE_MESSAGE = "a file of this job could not be read from storage; upload it again and create a new job"


def internal_error_message(job_id: str) -> str:
    return f"training failed because of an internal error; the operator's worker log has the details under {job_id}"


CHECKPOINT_UNREADABLE_MESSAGE = (
    "the job's latest checkpoint could not be read (the object store or the worker's disk failed); nothing was "
    "deleted, its checkpoints are kept"
)


def set_aside_message(checkpoint_id: str, step: int) -> str:
    return (
        f"checkpoint {checkpoint_id} (step {step}) cannot be resumed from: its training state is missing or damaged; "
        "the checkpoint is kept, to serve and download, and training continues from an earlier one"
    )


def out_of_memory_message(job: ClaimedJob) -> str:
    hp = job.hyperparameters
    return (
        "training ran out of device memory; lower batch_size (now "
        f"{hp.get('batch_size')}) or max_seq_length (now {hp.get('max_seq_length')}) and create the job again"
    )


@dataclass(frozen=True)
class JobOutcome:
    """How one run of a job ended: what the worker logs, and what the Celery task reports."""

    status: Literal[
        "succeeded",
        "failed",
        "cancelled",
        "paused",
        "handed_back",
        "left_to_reaper",
        "not_claimed",
        "claim_failed",
        "rank_lost",
    ]
    detail: str  # for the log: what happened, in words
    adapter_id: str | None = None  # succeeded
    error_code: str | None = None  # failed: the code the user sees
    exception: BaseException | None = None  # what went wrong, with its traceback for the log
    logged: bool = False  # logged already (by the job's rank 0, in its own process)

    def log(self, job_id: str) -> None:
        """The run's last line: INFO for an ordinary end, WARNING when the reaper takes over, ERROR for a failure."""
        level = {
            "failed": logging.ERROR,
            "left_to_reaper": logging.WARNING,
            "claim_failed": logging.WARNING,
            "rank_lost": logging.WARNING,
        }.get(self.status, logging.INFO)
        fields = {"outcome": self.status, "adapter_id": self.adapter_id, "error_code": self.error_code}
        extra = {name: value for name, value in fields.items() if value is not None}
        label = {"left_to_reaper": "stopped without an outcome"}.get(self.status, self.status.replace("_", " "))
        log.log(level, "job %s %s: %s", job_id, label, self.detail, exc_info=self.exception, extra=extra)


def run_training_job(settings: Settings, job_id: str) -> str | None:
    """Returns the adapter id, or None if the job was not run to success."""
    return run_job(settings, job_id).adapter_id


def run_job(settings: Settings, job_id: str) -> JobOutcome:
    """Claim and run the job, logging its start, its progress (from the recipe) and its outcome, each line with the
    job's id."""
    with job_logging_context(job_id):
        try:
            outcome = _claim_and_run(settings, job_id)
            if not outcome.logged:
                outcome.log(job_id)
            # Kept no longer: the exception's traceback holds the frames that hold the model, freed just below.
            outcome = replace(outcome, exception=None)
            return outcome
        finally:
            release_device_memory()


def _claim_and_run(settings: Settings, job_id: str) -> JobOutcome:
    try:
        job = lifecycle.claim(settings, job_id)
    except DATABASE_ERRORS as exc:  # the job is still queued: its task must run again, not be dropped
        return JobOutcome("claim_failed", "the database could not be reached to claim it; retrying", exception=exc)
    if job is None:
        return JobOutcome("not_claimed", "running elsewhere, finished or cancelled; nothing to do")
    log.info(
        "job %s: attempt %d started (%s on %s)",
        job.id,
        job.attempt,
        job.method,
        job.base_model,
        extra={"method": job.method, "base_model": job.base_model, "attempt": job.attempt},
    )
    storage = ObjectStorage.from_settings(settings)
    attempt = JobAttempt(settings, storage, job)
    with Heartbeat(settings.db_url, job, settings.heartbeat_seconds):
        if job.devices > 1 or settings.torchrun_one_device:  # its ranks under torchrun; rank 0 runs the below
            from worker.launch import run_ranks

            return run_ranks(settings, attempt)
        reporter = JobReporter(settings.db_url, job, retry_seconds=settings.db_retry_seconds)
        return run_to_an_outcome(settings, storage, attempt, reporter)


def run_to_an_outcome(
    settings: Settings,
    storage: ObjectStorage,
    attempt: JobAttempt,
    reporter: JobReporter,
    parallel: OneProcess = ONE_PROCESS,
) -> JobOutcome:
    """Train and publish the claimed job, and move it to where the run's end leaves it (`parallel`: as rank 0
    of several, worker/ranks.py)."""
    job = attempt.job
    try:
        adapter_id = _train_and_publish(settings, storage, attempt, reporter, parallel)
        return JobOutcome("succeeded", f"adapter {adapter_id} published", adapter_id=adapter_id)
    except JobCancelled:
        try:
            reporter.event("log", "training stopped: the job was cancelled")
        except JobLost as exc:  # cancelled, then taken by the reaper meanwhile: nothing more is this run's
            return JobOutcome("left_to_reaper", f"cancelled, then no longer this run's ({exc})")
        return JobOutcome("cancelled", "stopped at the user's request")
    except JobLost as exc:
        return JobOutcome("left_to_reaper", f"taken over by another worker ({exc}); this run stops")
    except StopRequested as exc:
        if reporter.pause_requested and not stop_requested():
            return _pause(attempt, exc.step)
        return _hand_back(settings, attempt, exc.step)
    except CheckpointUnreadable as exc:  # the object store or the disk failed for now: nothing is deleted
        return _hand_back(settings, attempt, None, reason=CHECKPOINT_UNREADABLE_MESSAGE, exception=exc)
    except (OperationalError, InterfaceError) as exc:
        # Retried for db_retry_seconds already: the heartbeat stops with this run, and the reaper re-queues it.
        return JobOutcome(
            "left_to_reaper", "the database stayed unreachable; the reaper will re-queue it", exception=exc
        )
    # What the user sees is a stable code and a message written for them; the detail goes to the log.
    except TrainingError as exc:
        return _fail(attempt, str(exc), exc.code)
    except torch.OutOfMemoryError as exc:
        return _fail(attempt, out_of_memory_message(job), ErrorCode.out_of_memory, exc)
    except FileNotFoundError as exc:
        return _fail(attempt, FILE_UNAVAILABLE_MESSAGE, ErrorCode.file_unavailable, exc)
    except RuntimeError as exc:
        if parallel.world_size > 1:
            # What a collective raises when another rank died (gloo: connection reset; NCCL: DistBackendError):
            # not this job's fault. The worker counts the attempt as a lost worker (worker/launch.py).
            return JobOutcome("rank_lost", f"a collective failed ({type(exc).__name__})", exception=exc)
        return _fail(attempt, internal_error_message(job.id), ErrorCode.internal_error, exc)
    except Exception as exc:
        return _fail(attempt, internal_error_message(job.id), ErrorCode.internal_error, exc)
    except BaseException:  # a cold shutdown (a second Ctrl-C): back to the queue, from the last checkpoint
        log.exception("job %s stopped", job.id)
        _hand_back(settings, attempt, None).log(job.id)
        raise


def _fail(attempt: JobAttempt, message: str, code: str, exception: BaseException | None = None) -> JobOutcome:
    attempt.fail(message, code=code)
    return JobOutcome("failed", f"{code}: {message}", error_code=str(code), exception=exception)


def _pause(attempt: JobAttempt, step: int | None) -> JobOutcome:
    """Paused at its user's request, its current step checkpointed: nothing runs it until it is resumed."""
    if not attempt.pause(step):
        return JobOutcome("left_to_reaper", "asked to pause, and the job is no longer this run's")
    where = f" at step {step}" if step is not None else ""
    return JobOutcome("paused", f"paused{where} at the user's request")


def _hand_back(
    settings: Settings,
    attempt: JobAttempt,
    step: int | None,
    *,
    reason: str | None = None,
    exception: BaseException | None = None,
) -> JobOutcome:
    """Queued again, for another worker (or this one after its restart) to resume from the latest checkpoint:
    the worker is stopping, or (`reason`) this attempt could not start."""
    why = reason or "the worker stopped"
    if not attempt.hand_back(step, reason=reason):
        return JobOutcome("left_to_reaper", f"{why}, and the job is no longer this run's", exception=exception)
    where = f" at step {step}" if step is not None else ""
    return send_again(settings, attempt, why, where=where, exception=exception)


def send_again(
    settings: Settings, attempt: JobAttempt, why: str, *, where: str = "", exception: BaseException | None = None
) -> JobOutcome:
    """The job, just moved back to the queue by this attempt (`why`): its task sent, for a worker to resume it
    from the latest checkpoint; if the broker does not answer, left running with a stale heartbeat for the reaper
    to send."""
    job = attempt.job
    try:
        state.enqueue(settings, job.id, job.method, job.devices)
    except Exception as exc:
        attempt.unhand()
        return JobOutcome("left_to_reaper", f"{why}; its task could not be sent, the reaper will", exception=exc)
    return JobOutcome(
        "handed_back", f"{why}; back in the queue{where}, to resume from its checkpoint", exception=exception
    )


def base_model_of(settings: Settings, job: ClaimedJob) -> ModelRecord:
    """The job's base model as it was when the job was created, or a TrainingError saying what changed."""
    with session_scope(settings.db_url) as session:
        record = find_model(session, job.base_model)
    if record is None:
        raise TrainingError(f"base model {job.base_model} is no longer registered", code=ErrorCode.model_unavailable)
    if job.base_model_revision not in (None, record.revision):
        raise TrainingError(
            f"base model {job.base_model} was registered again, with other files, after this job was created; "
            "create the job again",
            code=ErrorCode.model_unavailable,
        )
    return record


def _resume_state(checkpoints: JobCheckpoints, reporter: JobReporter) -> tuple[dict[str, Any] | None, str]:
    """The latest readable checkpoint's state to continue from, or None (with why) to train from the start."""
    row, resume, set_aside = checkpoints.resume_state()
    for bad in set_aside:
        reporter.event("log", set_aside_message(bad.id, bad.step), level="warning")
    if row is None:
        return None, "no checkpoint to resume from: training from the start"
    return resume, f"resumed from checkpoint {row.id} at step {row.step}"


def _train_and_publish(
    settings: Settings, storage: ObjectStorage, attempt: JobAttempt, reporter: JobReporter, parallel: OneProcess
) -> str | None:
    job = attempt.job
    reset_peak_memory()
    checkpoints = JobCheckpoints(settings, storage, job)
    # Where to start from first: an attempt that cannot read its checkpoint now goes back before loading anything.
    resume, how = _resume_state(checkpoints, reporter) if job.attempt > 1 else (None, "")
    with starting_weights(settings, storage, job) as start_from:
        # The other ranks build the same recipe on the same base model (they read no database).
        record = parallel.share(base_model_of(settings, job))
        recipe = job_recipe(
            settings,
            storage,
            job,
            record,
            reporter,
            checkpoints,
            start_from,
            stop=reporter.should_stop,
            parallel=parallel,
        )
        recipe.setup(resume=resume)
    if start_from is not None and resume is None:
        reporter.event("log", f"training starts from the weights of {init_from(job.hyperparameters)}")
    if how:
        reporter.event("log", f"attempt {job.attempt}: {how}", {"step": recipe.position.step})
    metrics = recipe.train()
    reporter.check_cancelled()
    # Beside the job's metrics (a sweep's table shows it): the device's peak, or on a CPU the worker process's.
    metrics["peak_memory_bytes"] = peak_memory_bytes(recipe.placement.device)
    reporter.note({"peak_memory_bytes": metrics["peak_memory_bytes"]})

    adapter_id = new_id("adapter")
    key = f"adapters/{job.tenant_id}/{adapter_id}.tar.gz"
    size, sha256 = store_artifact(
        settings, storage, job, recipe, key, {"adapter_id": adapter_id, "metrics": metrics}, what="the job's adapter"
    )
    adapter = Adapter(
        id=adapter_id,
        tenant_id=job.tenant_id,
        job_id=job.id,
        base_model=job.base_model,
        base_model_revision=job.base_model_revision,
        method=job.method,
        name=f"{job.base_model}:{job.suffix}" if job.suffix else None,
        format=recipe.method.artifact_format,
        storage_key=key,
        size_bytes=size,
        sha256=sha256,
    )
    try:
        published = attempt.succeed(adapter)
    except BaseException:
        _discard_unless_recorded(settings, storage, adapter)
        raise
    if not published:
        storage.delete(key)  # cancelled (or taken over) between the last step and now: publish nothing
        raise JobCancelled("cancelled before publishing")
    return adapter_id


def reset_peak_memory() -> None:
    """Start this job's peak memory from what the process holds now: the CUDA allocator's peak, and on Linux the
    process's peak resident size (VmHWM, reset by writing 5 to /proc/self/clear_refs), so that a job's figure is
    its own, not the largest of the jobs this worker ran before."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_bytes(device: torch.device) -> int:
    """The most memory the job held since `reset_peak_memory`: on a CUDA device, its allocator's peak; on a CPU, the
    process's peak resident size (VmHWM; where /proc has none, the process's lifetime peak)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _discard_unless_recorded(settings: Settings, storage: ObjectStorage, adapter: Adapter) -> None:
    """Recording the adapter failed: its archive goes unless its row was committed after all (a commit whose
    answer was lost). Kept when the database cannot say: an object left over costs storage, a row without its
    object loses the user's adapter."""
    try:
        with session_scope(settings.db_url) as session:
            recorded = session.get(Adapter, adapter.id) is not None
    except Exception:
        log.warning("adapter %s: could not tell whether it was recorded; its archive stays", adapter.id)
        return
    if not recorded:
        storage.delete(adapter.storage_key)
