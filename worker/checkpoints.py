"""Publishing what a recipe trained: adapters, and checkpoints to resume from.

A checkpoint is two objects under `checkpoints/<tenant>/<job>/<checkpoint id>/`: `artifact.tar.gz`, the artifact
as trained up to that step (an adapter archive, served and downloaded by the checkpoint's id like an adapter),
and `state.pt`, the recipe's whole state (`TrainingRecipe.state_dict`) that a resumed run continues from. Its
row is written only when both are stored, and only while this attempt owns the running job; the job keeps its
latest `keep_checkpoints`.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from sqlalchemy import delete, select

from app.core.db import session_scope
from app.core.ids import new_id
from app.core.models import Checkpoint, Job, JobStatus
from app.core.settings import Settings
from app.core.storage import ObjectStorage
from app.jobs import repository
from app.jobs.service import delete_checkpoint_object, drop_training_states
from app.ml import adapter_format
from worker.lifecycle import ClaimedJob, JobCancelled, JobLost, retrying

if TYPE_CHECKING:
    from worker.recipe import TrainingRecipe

log = logging.getLogger(__name__)


def store_artifact(
    settings: Settings, storage: ObjectStorage, recipe: TrainingRecipe, key: str, manifest: dict[str, Any]
) -> tuple[int, str]:
    """Export what the recipe trained, pack it with its manifest and store it under `key`: (size, sha256)."""
    job = recipe.job
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
        storage.put_path(key, archive)
    return size, sha256


class JobCheckpoints:
    """A job's checkpoints: saved by its recipe, the latest loaded when a new attempt resumes."""

    def __init__(self, settings: Settings, storage: ObjectStorage, job: ClaimedJob) -> None:
        self.settings = settings
        self.storage = storage
        self.job = job
        self.keep = int(job.hyperparameters.get("keep_checkpoints", 3))

    def latest_first(self) -> list[Checkpoint]:
        def read() -> list[Checkpoint]:
            with session_scope(self.settings.db_url) as session:
                return repository.list_checkpoints(session, job_id=self.job.id)

        return retrying(self.settings.db_retry_seconds, "reading the job's checkpoints", read)

    def resume_state(self) -> tuple[Checkpoint | None, dict[str, Any] | None, list[Checkpoint]]:
        """The latest checkpoint whose state can be read, and that state (None, None: start over); and the later
        ones that could not be read, now deleted (else they would outrank, and prune, what this run saves)."""
        unreadable: list[Checkpoint] = []
        for row in self.latest_first():
            if row.state_key:
                try:
                    return row, self.load_state(row), unreadable
                except Exception:
                    log.exception("job %s: the state of checkpoint %s could not be read", self.job.id, row.id)
            unreadable.append(row)
            self.remove(row)
        return None, None, unreadable

    def remove(self, row: Checkpoint) -> None:
        def write() -> None:
            with session_scope(self.settings.db_url) as session:
                session.execute(delete(Checkpoint).where(Checkpoint.id == row.id))

        retrying(self.settings.db_retry_seconds, "deleting a checkpoint", write)
        self._delete(row)

    def drop_states(self) -> None:
        """The job has ended: nothing will resume from its checkpoints, so their training states go (the
        artifacts stay, to serve and download)."""
        with session_scope(self.settings.db_url) as session:
            drop_training_states(session, self.storage, job_id=self.job.id)

    def load_state(self, checkpoint: Checkpoint) -> dict[str, Any]:
        self.settings.tmp_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="resume-", dir=self.settings.tmp_dir) as tmp:
            path = Path(tmp) / "state.pt"
            self.storage.download(checkpoint.state_key, path)
            state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        return state

    def save(self, recipe: TrainingRecipe) -> None:
        at = recipe.position
        checkpoint_id = new_id("ftckpt")
        prefix = f"checkpoints/{self.job.tenant_id}/{self.job.id}/{checkpoint_id}"
        size, sha256 = store_artifact(
            self.settings,
            self.storage,
            recipe,
            f"{prefix}/artifact.tar.gz",
            {"checkpoint_id": checkpoint_id, "step": at.step, "metrics": at.metrics},
        )
        self.settings.tmp_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="state-", dir=self.settings.tmp_dir) as tmp:
            path = Path(tmp) / "state.pt"
            torch.save(recipe.state_dict(), path)
            state_size = path.stat().st_size
            self.storage.put_path(f"{prefix}/state.pt", path)
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
        try:
            pruned = retrying(self.settings.db_retry_seconds, "recording a checkpoint", lambda: self._record(row))
        except (JobCancelled, JobLost):
            self._delete(row)  # nobody will list it
            raise
        for old in pruned:
            self._delete(old)
        recipe.reporter.event(
            "checkpoint",
            f"checkpoint {checkpoint_id} saved at step {at.step}",
            {"checkpoint_id": checkpoint_id, "step": at.step},
        )

    def _record(self, row: Checkpoint) -> list[Checkpoint]:
        """Insert the row while this attempt owns the running job; returns the rows past `keep`, deleted."""
        with session_scope(self.settings.db_url) as session:
            job = session.scalars(select(Job).where(Job.id == self.job.id).with_for_update()).one()
            if job.attempt != self.job.attempt:
                raise JobLost(f"attempt {job.attempt} took the job over")
            if job.status != JobStatus.running:
                raise JobCancelled(job.status.value)
            session.add(row)
            session.flush()
            pruned = repository.list_checkpoints(session, job_id=self.job.id)[self.keep :]
            for old in pruned:
                session.delete(old)
            return pruned

    def _delete(self, row: Checkpoint) -> None:
        for key in (row.storage_key, row.state_key):
            if key:
                delete_checkpoint_object(self.storage, key, row.id)
