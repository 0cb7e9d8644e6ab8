"""Publishing what a recipe trained: adapter archives, and checkpoints to resume from.

A checkpoint is stored as two objects (app/jobs/checkpoints.py) and recorded only when both are stored, and only
while this attempt owns the running job; the job keeps its latest `keep_checkpoints`.

Resuming deletes no checkpoint: a training state proven unusable (missing from the object store, or not a state)
is set aside, its checkpoint kept to serve and download; a state that cannot be fetched for a reason that may
pass (the object store or the local disk failing) raises `CheckpointUnreadable`, and the job goes back to the queue.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from app.core.db import session_scope
from app.core.error_codes import ErrorCode
from app.core.ids import new_id
from app.core.models import Checkpoint
from app.core.settings import Settings
from app.core.storage import ObjectStorage, StoreError
from app.core.usage import StorageQuotaExceeded, check_storage
from app.jobs import checkpoints, repository
from app.jobs.state import ClaimedJob, JobCancelled, JobLost, owned
from app.ml import adapter_format
from app.ml.objectives import stored_hyperparameters
from app.ml.training import TrainingError, TrainingRecipe
from worker.lifecycle import retrying

log = logging.getLogger(__name__)


class CheckpointUnreadable(Exception):
    """A checkpoint's training state could not be fetched for a reason that may pass (the object store did not
    answer, the local disk is full): the attempt hands the job back to the queue, and nothing is deleted."""


class UnusableState(Exception):
    """A checkpoint's training state is proven unusable: the object store says it does not exist, or what it
    holds is not a training state."""


def check_quota(settings: Settings, job: ClaimedJob, *, adding: int, freeing: int = 0, what: str) -> None:
    """Before the job stores `adding` bytes (and its checkpoint pruning frees `freeing`): fail it with
    storage_quota_exceeded if its tenant would pass its limit. What it stored already is kept. The check is tried
    again while the database does not answer, as the job's writes are."""

    def check() -> None:
        with session_scope(settings.db_url) as session:
            check_storage(
                session,
                tenant_id=job.tenant_id,
                adding=adding - freeing,
                limit=settings.max_stored_bytes_per_tenant,
                what=what,
                lock=False,
                for_job=job.id,
            )

    try:
        retrying(settings.db_retry_seconds, "checking the storage quota", check)
    except StorageQuotaExceeded as exc:
        raise TrainingError(
            f"{exc.message}; the job's checkpoints so far are kept", code=ErrorCode.storage_quota_exceeded
        ) from None


def store_artifact(
    settings: Settings,
    storage: ObjectStorage,
    job: ClaimedJob,
    recipe: TrainingRecipe,
    key: str,
    manifest: dict[str, Any],
    *,
    what: str,
    also: int = 0,
    freeing: int = 0,
) -> tuple[int, str]:
    """Export what the recipe trained, pack it with its manifest and store it under `key`: (size, sha256). Refused
    (storage_quota_exceeded) before it is stored if it, with `also` bytes more to store and `freeing` bytes to be
    freed, would bring the tenant past its storage limit."""
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
                "job_id": job.id,
                "base_model": job.base_model,
                "method": job.method,
                "format": recipe.method.artifact_format,
                "base_model_revision": job.base_model_revision,
                "base_model_weights_sha256": recipe.base_weights().weights_sha256,
                "hyperparameters": job.hyperparameters,
                **manifest,
            },
        )
        check_quota(settings, job, adding=size + also, freeing=freeing, what=what)
        storage.put_path(key, archive)
    return size, sha256


class JobCheckpoints:
    """A job's checkpoints: saved by its recipe (the recipe's `Checkpointer`), the latest loaded when a new attempt
    resumes."""

    def __init__(self, settings: Settings, storage: ObjectStorage, job: ClaimedJob) -> None:
        self.settings = settings
        self.storage = storage
        self.job = job
        self.keep = stored_hyperparameters(job.method, job.hyperparameters).keep_checkpoints

    def _retrying(self, what: str, write: Any) -> Any:
        return retrying(self.settings.db_retry_seconds, what, write)

    def latest_first(self) -> list[Checkpoint]:
        def read() -> list[Checkpoint]:
            with session_scope(self.settings.db_url) as session:
                return repository.list_checkpoints(session, job_id=self.job.id)

        return self._retrying("reading the job's checkpoints", read)  # type: ignore[no-any-return]

    def resume_state(self) -> tuple[Checkpoint | None, dict[str, Any] | None, list[Checkpoint]]:
        """The latest checkpoint whose training state can be read, and that state (None, None: start over); and the
        later ones whose state proved unusable, now set aside (so that no attempt tries them again); they stay
        listed, served and downloadable. CheckpointUnreadable when a state could not be fetched for now;
        JobCancelled or JobLost when the job stopped being this attempt's."""
        set_aside: list[Checkpoint] = []
        for row in self.latest_first():
            if not row.state_key:
                continue  # set aside by an earlier attempt
            try:
                return row, self.load_state(row), set_aside
            except UnusableState as exc:
                log.warning("job %s: the training state of checkpoint %s is unusable (%s)", self.job.id, row.id, exc)
            self.set_aside(row)
            set_aside.append(row)
        return None, None, set_aside

    def set_aside(self, row: Checkpoint) -> None:
        """Nothing resumes from the checkpoint's state again (its object goes); the checkpoint stays."""

        def write() -> None:
            with session_scope(self.settings.db_url) as session:
                owned(session, self.job.id, self.job.attempt)  # not once the user cancelled (their cancel decides)
                checkpoints.set_aside_state(session, self.storage, checkpoint_id=row.id)

        self._retrying("setting a checkpoint's training state aside", write)

    def load_state(self, checkpoint: Checkpoint) -> dict[str, Any]:
        """The checkpoint's training state; UnusableState if it is missing or damaged, CheckpointUnreadable if the
        object store or the local disk failed."""
        try:
            self.settings.tmp_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix="resume-", dir=self.settings.tmp_dir) as tmp:
                path = Path(tmp) / "state.pt"
                try:
                    self.storage.download(checkpoint.state_key, path)
                except FileNotFoundError:
                    raise UnusableState("not in the object store") from None
                try:
                    state = torch.load(path, map_location="cpu", weights_only=True)
                except OSError:
                    raise  # the disk, not the state
                except Exception as exc:
                    raise UnusableState(f"not a training state: {type(exc).__name__}") from exc
        except (StoreError, OSError) as exc:
            log.warning("job %s: checkpoint %s could not be read (%s)", self.job.id, checkpoint.id, type(exc).__name__)
            raise CheckpointUnreadable(f"checkpoint {checkpoint.id} could not be read") from exc
        if not isinstance(state, dict):
            raise UnusableState(f"not a training state: a {type(state).__name__}")
        return state

    def save(self, recipe: TrainingRecipe) -> None:
        at = recipe.position
        checkpoint_id = new_id("ftckpt")
        prefix = checkpoints.checkpoint_prefix(self.job.tenant_id, self.job.id, checkpoint_id)

        def prunable() -> int:  # what recording it will prune
            with session_scope(self.settings.db_url) as session:
                return checkpoints.pruned_bytes(session, job_id=self.job.id, keep=self.keep)

        freeing: int = self._retrying("reading the job's checkpoints", prunable)
        what = f"checkpoint {checkpoint_id} at step {at.step}"
        self.settings.tmp_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="state-", dir=self.settings.tmp_dir) as tmp:
            path = Path(tmp) / "state.pt"
            torch.save(recipe.state_dict(), path)
            state_size = path.stat().st_size
            size, sha256 = store_artifact(
                self.settings,
                self.storage,
                self.job,
                recipe,
                f"{prefix}/artifact.tar.gz",
                {"checkpoint_id": checkpoint_id, "step": at.step, "metrics": at.metrics},
                what=what,
                also=state_size,
                freeing=freeing,
            )
            try:
                self.storage.put_path(f"{prefix}/state.pt", path)
            except BaseException:
                self.storage.delete(f"{prefix}/artifact.tar.gz")  # not recorded: nobody would list it
                raise
        row = Checkpoint(
            id=checkpoint_id,
            tenant_id=self.job.tenant_id,
            job_id=self.job.id,
            attempt=self.job.attempt,
            step=at.step,
            epoch=at.epoch - 1 if at.batches_done == 0 else at.epoch,  # at an epoch's end: that epoch
            metrics=dict(at.metrics),
            base_model=self.job.base_model,
            base_model_revision=self.job.base_model_revision,
            method=self.job.method,
            format=recipe.method.artifact_format,
            storage_key=f"{prefix}/artifact.tar.gz",
            size_bytes=size,
            sha256=sha256,
            state_key=f"{prefix}/state.pt",
            state_size_bytes=state_size,
        )

        def write() -> list[Checkpoint]:
            with session_scope(self.settings.db_url) as session:
                owned(session, self.job.id, self.job.attempt)  # this attempt still runs the job, locked
                return checkpoints.record(session, row, keep=self.keep)

        try:
            pruned = self._retrying("recording a checkpoint", write)
        except (JobCancelled, JobLost):
            checkpoints.delete_objects(self.storage, row)  # nobody will list it
            raise
        for old in pruned:
            checkpoints.delete_objects(self.storage, old)
        recipe.reporter.event(
            "checkpoint",
            f"checkpoint {checkpoint_id} saved at step {at.step}",
            {"checkpoint_id": checkpoint_id, "step": at.step},
        )
