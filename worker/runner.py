"""Run one training job end to end: claim it, train, publish the adapter, record the outcome.

Whatever happens inside, the job leaves `running`: succeeded, failed with a readable error, or
cancelled by the user.
"""

from __future__ import annotations

import gc
import logging
import tempfile
from pathlib import Path

import torch

from app.core.db import session_scope
from app.core.ids import new_id
from app.core.models import Adapter
from app.core.settings import Settings
from app.core.storage import ObjectStorage
from app.ml import adapter_format
from app.ml.registry import ModelRecord, find_model
from worker import lifecycle
from worker.errors import TrainingError
from worker.lifecycle import ClaimedJob, JobCancelled, JobReporter, WorkerStopping
from worker.recipe import TrainingRecipe

log = logging.getLogger(__name__)

STOPPED_MESSAGE = "the worker was stopped while this job ran; create a new job to train again"
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
    job = lifecycle.claim(settings.db_url, job_id)
    if job is None:
        log.info("job %s is not queued (already taken, finished or cancelled); nothing to do", job_id)
        return None
    reporter = JobReporter(settings.db_url, job.id)
    storage = ObjectStorage.from_settings(settings)
    try:
        return _run_claimed(settings, storage, job, reporter)
    finally:
        release_device_memory()


def _run_claimed(settings: Settings, storage: ObjectStorage, job: ClaimedJob, reporter: JobReporter) -> str | None:
    try:
        return _train_and_publish(settings, storage, job, reporter)
    except JobCancelled:
        log.info("job %s was cancelled; stopped", job.id)
        reporter.event("log", "training stopped: the job was cancelled")
        return None
    # What the user sees is a stable code and a message written for them; the detail goes to the log.
    except WorkerStopping:
        lifecycle.fail(settings.db_url, job.id, STOPPED_MESSAGE, code="worker_stopped")
        return None
    except TrainingError as exc:
        log.info("job %s failed: %s", job.id, exc)
        lifecycle.fail(settings.db_url, job.id, str(exc), code=exc.code)
        return None
    except torch.OutOfMemoryError:
        log.exception("job %s ran out of device memory", job.id)
        lifecycle.fail(settings.db_url, job.id, out_of_memory_message(job), code="out_of_memory")
        return None
    except FileNotFoundError:
        log.exception("job %s failed: an object is missing from storage", job.id)
        lifecycle.fail(settings.db_url, job.id, FILE_UNAVAILABLE_MESSAGE, code="file_unavailable")
        return None
    except Exception:
        log.exception("job %s failed", job.id)
        lifecycle.fail(settings.db_url, job.id, internal_error_message(job.id), code="internal_error")
        return None
    except BaseException:  # the worker is being stopped (cold shutdown, Ctrl-C): say so, then stop
        log.exception("job %s stopped", job.id)
        lifecycle.fail(settings.db_url, job.id, STOPPED_MESSAGE, code="worker_stopped")
        raise


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


def _train_and_publish(
    settings: Settings, storage: ObjectStorage, job: ClaimedJob, reporter: JobReporter
) -> str | None:
    recipe = TrainingRecipe(settings, storage, job, base_model_of(settings, job), reporter)
    recipe.setup()
    metrics = recipe.train()
    reporter.check_cancelled()

    adapter_id = new_id("adapter")
    key = f"adapters/{job.tenant_id}/{adapter_id}.tar.gz"
    settings.tmp_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="export-", dir=settings.tmp_dir) as tmp:
        folder = Path(tmp) / "adapter"
        folder.mkdir()
        recipe.export(folder)
        archive = Path(tmp) / "adapter.tar.gz"
        size, sha256 = adapter_format.pack(
            folder,
            archive,
            {
                "adapter_id": adapter_id,
                "job_id": job.id,
                "base_model": job.base_model,
                "method": job.method,
                "format": recipe.method.artifact_format,
                "base_model_revision": job.base_model_revision,
                "base_model_weights_sha256": recipe.base_weights().weights_sha256,
                "hyperparameters": job.hyperparameters,
                "metrics": metrics,
            },
        )
        storage.put_path(key, archive)
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
    if not lifecycle.succeed(settings.db_url, job, adapter):
        storage.delete(key)  # cancelled between the last step and now: publish nothing
        raise JobCancelled("cancelled before publishing")
    return adapter_id
