"""Run one training job end to end: claim it, train, publish the adapter, record the outcome.

Whatever happens inside, the job leaves `running`: succeeded, failed with a readable error, or
cancelled by the user.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from app.core.ids import new_id
from app.core.models import Adapter
from app.core.settings import Settings
from app.core.storage import ObjectStorage
from app.ml import adapter_format
from worker import lifecycle
from worker.lifecycle import ClaimedJob, JobCancelled, JobReporter, WorkerStopping
from worker.recipe import TrainingError, TrainingRecipe

log = logging.getLogger(__name__)

STOPPED_MESSAGE = "the worker was stopped while this job ran; create a new job to train again"


def run_training_job(settings: Settings, job_id: str) -> str | None:
    """Returns the adapter id, or None if the job was not run to success."""
    job = lifecycle.claim(settings.db_url, job_id)
    if job is None:
        log.info("job %s is not queued (already taken, finished or cancelled); nothing to do", job_id)
        return None
    reporter = JobReporter(settings.db_url, job.id)
    storage = ObjectStorage.from_settings(settings)
    try:
        return _train_and_publish(settings, storage, job, reporter)
    except JobCancelled:
        log.info("job %s was cancelled; stopped", job.id)
        reporter.event("log", "training stopped: the job was cancelled")
        return None
    except WorkerStopping:
        lifecycle.fail(settings.db_url, job.id, STOPPED_MESSAGE)
        return None
    except TrainingError as exc:
        lifecycle.fail(settings.db_url, job.id, str(exc))
        return None
    except Exception as exc:
        log.exception("job %s failed", job.id)
        lifecycle.fail(settings.db_url, job.id, f"training failed: {type(exc).__name__}: {exc}")
        return None
    except BaseException as exc:  # the worker is being stopped (cold shutdown, Ctrl-C): say so, then stop
        lifecycle.fail(settings.db_url, job.id, f"{STOPPED_MESSAGE} ({type(exc).__name__})")
        raise


def _train_and_publish(
    settings: Settings, storage: ObjectStorage, job: ClaimedJob, reporter: JobReporter
) -> str | None:
    recipe = TrainingRecipe(settings, storage, job, reporter)
    recipe.setup()
    metrics = recipe.train()
    reporter.check_cancelled()

    adapter_id = new_id("adapter")
    key = f"adapters/{job.tenant_id}/{adapter_id}.tar.gz"
    with tempfile.TemporaryDirectory(prefix="tuneforge-export-") as tmp:
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
