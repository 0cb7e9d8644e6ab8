"""Run one training job end to end: claim it, train (resuming from its latest checkpoint), publish the adapter,
record the outcome.

Whatever happens inside, the job leaves `running`: succeeded, failed with a readable error, cancelled by the
user, or back in the queue when the worker is stopped. Only a worker that dies outright (kill -9, a lost
machine) or loses the database for longer than `db_retry_seconds` leaves it running, and then its heartbeat
stops and the reaper re-queues it.
"""

from __future__ import annotations

import gc
import logging

import torch
from sqlalchemy.exc import InterfaceError, OperationalError

from app.core.db import session_scope
from app.core.ids import new_id
from app.core.models import Adapter
from app.core.queue import enqueue_training
from app.core.settings import Settings
from app.core.storage import ObjectStorage
from app.ml.methods import METHODS
from app.ml.registry import ModelRecord, find_model
from worker import lifecycle
from worker.checkpoints import JobCheckpoints, store_artifact
from worker.errors import TrainingError
from worker.lifecycle import ClaimedJob, Heartbeat, JobCancelled, JobLost, JobReporter, WorkerStopping
from worker.recipe import TrainingRecipe

log = logging.getLogger(__name__)

FILE_UNAVAILABLE_MESSAGE = "a file of this job could not be read from storage; upload it again and create a new job"


def internal_error_message(job_id: str) -> str:
    return f"training failed because of an internal error; the operator's worker log has the details under {job_id}"


def out_of_memory_message(job: ClaimedJob) -> str:
    hp = job.hyperparameters
    return (
        "training ran out of device memory; lower batch_size (now "
        f"{hp.get('batch_size')}) or max_seq_length (now {hp.get('max_seq_length')}) and create the job again"
    )


def release_device_memory() -> None:
    """Give the memory of a finished job (above all a failed one) back, so that the next job has all of it."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_training_job(settings: Settings, job_id: str) -> str | None:
    """Returns the adapter id, or None if the job was not run to success."""
    job = lifecycle.claim(
        settings.db_url,
        job_id,
        heartbeat_timeout=settings.heartbeat_timeout_seconds,
        max_attempts=settings.max_job_attempts,
    )
    if job is None:
        log.info("job %s cannot be claimed (running elsewhere, finished or cancelled); nothing to do", job_id)
        return None
    log.info("job %s: attempt %d started", job.id, job.attempt)
    storage = ObjectStorage.from_settings(settings)
    try:
        with Heartbeat(settings.db_url, job, settings.heartbeat_seconds):
            reporter = JobReporter(settings.db_url, job, retry_seconds=settings.db_retry_seconds)
            return _run_claimed(settings, storage, job, reporter)
    finally:
        release_device_memory()


def _run_claimed(settings: Settings, storage: ObjectStorage, job: ClaimedJob, reporter: JobReporter) -> str | None:
    """Run the job to its end (and then drop its checkpoints' training states), or leave it to be resumed."""
    adapter_id = _run_to_an_outcome(settings, storage, job, reporter)
    if lifecycle.has_ended(settings.db_url, job):
        try:
            JobCheckpoints(settings, storage, job).drop_states()
        except Exception:  # left behind: storage, not correctness
            log.exception("job %s: its checkpoints' training states could not be deleted", job.id)
    return adapter_id


def _run_to_an_outcome(
    settings: Settings, storage: ObjectStorage, job: ClaimedJob, reporter: JobReporter
) -> str | None:
    retry = settings.db_retry_seconds
    try:
        return _train_and_publish(settings, storage, job, reporter)
    except JobCancelled:
        log.info("job %s was cancelled; stopped", job.id)
        reporter.event("log", "training stopped: the job was cancelled")
        return None
    except JobLost as exc:
        log.warning("job %s was taken over by another worker (%s); this run stops", job.id, exc)
        return None
    except WorkerStopping as exc:
        _hand_back(settings, job, exc.step)
        return None
    except (OperationalError, InterfaceError):
        # Retried for db_retry_seconds already: the heartbeat stops with this run, and the reaper re-queues it.
        log.exception("job %s: the database stayed unreachable; the reaper will re-queue the job", job.id)
        return None
    # What the user sees is a stable code and a message written for them; the detail goes to the log.
    except TrainingError as exc:
        log.info("job %s failed: %s", job.id, exc)
        lifecycle.fail(settings.db_url, job, str(exc), code=exc.code, retry_seconds=retry)
        return None
    except torch.OutOfMemoryError:
        log.exception("job %s ran out of device memory", job.id)
        lifecycle.fail(settings.db_url, job, out_of_memory_message(job), code="out_of_memory", retry_seconds=retry)
        return None
    except FileNotFoundError:
        log.exception("job %s failed: an object is missing from storage", job.id)
        lifecycle.fail(settings.db_url, job, FILE_UNAVAILABLE_MESSAGE, code="file_unavailable", retry_seconds=retry)
        return None
    except Exception:
        log.exception("job %s failed", job.id)
        lifecycle.fail(settings.db_url, job, internal_error_message(job.id), code="internal_error", retry_seconds=retry)
        return None
    except BaseException:  # a cold shutdown (a second Ctrl-C): back to the queue, from the last checkpoint
        log.exception("job %s stopped", job.id)
        _hand_back(settings, job, None)
        raise


def _hand_back(settings: Settings, job: ClaimedJob, step: int | None) -> None:
    """Queued again, for another worker (or this one after its restart) to resume from the latest checkpoint."""
    if not lifecycle.hand_back(settings.db_url, job, step=step, retry_seconds=min(settings.db_retry_seconds, 10)):
        return
    try:
        enqueue_training(settings, job.id, needs_cuda=METHODS[job.method].needs_cuda)
    except Exception:
        log.exception("job %s: its task could not be sent; the reaper will send it", job.id)
        lifecycle.unhand(settings.db_url, job)
        return
    log.info("job %s handed back to the queue at step %s", job.id, step)


def base_model_of(settings: Settings, job: ClaimedJob) -> ModelRecord:
    """The job's base model as it was when the job was created, or a TrainingError saying what changed."""
    with session_scope(settings.db_url) as session:
        record = find_model(session, job.base_model)
    if record is None:
        raise TrainingError(f"base model {job.base_model} is no longer registered", code="model_unavailable")
    if job.base_model_revision not in (None, record.revision):
        raise TrainingError(
            f"base model {job.base_model} was registered again, with other files, after this job was created; "
            "create the job again",
            code="model_unavailable",
        )
    return record


def _resume_state(checkpoints: JobCheckpoints, reporter: JobReporter) -> tuple[dict | None, str]:  # type: ignore[type-arg]
    """The latest readable checkpoint's state to continue from, or None (with why) to train from the start."""
    row, state, unreadable = checkpoints.resume_state()
    for bad in unreadable:
        reporter.event("log", f"checkpoint {bad.id} (step {bad.step}) could not be read; deleted", level="warning")
    if row is None:
        return None, "no checkpoint to resume from: training from the start"
    return state, f"resumed from checkpoint {row.id} at step {row.step}"


def _train_and_publish(
    settings: Settings, storage: ObjectStorage, job: ClaimedJob, reporter: JobReporter
) -> str | None:
    checkpoints = JobCheckpoints(settings, storage, job)
    recipe = TrainingRecipe(settings, storage, job, base_model_of(settings, job), reporter, checkpoints)
    resume, how = _resume_state(checkpoints, reporter) if job.attempt > 1 else (None, "")
    recipe.setup(resume=resume)
    if how:
        reporter.event("log", f"attempt {job.attempt}: {how}", {"step": recipe.position.step})
    metrics = recipe.train()
    reporter.check_cancelled()

    adapter_id = new_id("adapter")
    key = f"adapters/{job.tenant_id}/{adapter_id}.tar.gz"
    size, sha256 = store_artifact(settings, storage, recipe, key, {"adapter_id": adapter_id, "metrics": metrics})
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
    if not lifecycle.succeed(settings.db_url, job, adapter, retry_seconds=settings.db_retry_seconds):
        storage.delete(key)  # cancelled (or taken over) between the last step and now: publish nothing
        raise JobCancelled("cancelled before publishing")
    return adapter_id
