"""A claimed job as a training recipe: its files read from the object store, its base model and tokenizer on
the worker's device, its progress to the job's row, its checkpoints to the object store."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import select, update

from app.adapters.service import get_servable
from app.core.db import session_scope
from app.core.error_codes import ErrorCode
from app.core.errors import NotFound
from app.core.models import Job, Sweep, SweepTrial
from app.core.settings import Settings
from app.core.storage import ObjectStorage
from app.jobs.state import ClaimedJob
from app.ml import adapter_format
from app.ml.device import PlacementError, resolve_placement
from app.ml.methods import METHODS
from app.ml.methods.base import MethodContext, MethodUnavailable
from app.ml.models import ModelRecord, ModelStore, ModelUnavailable
from app.ml.objectives import init_from, objective_of, stored_hyperparameters
from app.ml.training import (
    Checkpointer,
    RecipeLimits,
    Reporter,
    StopSignal,
    TrainingError,
    TrainingRecipe,
    read_examples,
    training_base_model,
)
from app.ml.training.parallel import ONE_PROCESS, OneProcess
from app.sweeps.service import rung_decision
from worker.lifecycle import stop_requested

log = logging.getLogger(__name__)


def rank_device(device: str) -> str:
    """The device of this process: under torchrun, a rank's own CUDA device (LOCAL_RANK of those the worker owns)
    where the worker trains on CUDA."""
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is None or device in ("cpu", "mps") or not torch.cuda.is_available():
        return device
    return f"cuda:{int(local_rank)}"


def recipe_limits(settings: Settings) -> RecipeLimits:
    return RecipeLimits(
        max_batch_tokens=settings.train_max_batch_tokens,
        checkpoint_minutes=settings.checkpoint_minutes,
        log_every_steps=settings.log_every_steps,
    )


def job_recipe(
    settings: Settings,
    storage: ObjectStorage,
    job: ClaimedJob,
    record: ModelRecord,
    reporter: Reporter,
    checkpointer: Checkpointer | None,
    start_from: Path | None = None,
    *,
    stop: StopSignal = stop_requested,
    parallel: OneProcess = ONE_PROCESS,
) -> TrainingRecipe:
    """The recipe that trains `job` on this worker (set up by `recipe.setup`), or a TrainingError the user can
    act on (device, base model or method unavailable; unreadable data). `start_from`: the unpacked artifact of
    the fine-tuned model the job continues from (`starting_weights`)."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    try:
        placement = resolve_placement(rank_device(settings.device), settings.dtype)
    except PlacementError as exc:
        log.error("job %s: %s", job.id, exc)
        raise TrainingError(
            "the worker that took this job cannot use its configured device; the operator's worker log has the details",
            code=ErrorCode.device_unavailable,
        ) from None
    method = METHODS[job.method]
    hyperparameters = stored_hyperparameters(job.method, job.hyperparameters)
    models = ModelStore(settings.models_dir, storage)
    try:
        tokenizer = models.tokenizer(record)
        train = read_examples(storage, job.training_file_key)
        valid = read_examples(storage, job.validation_file_key) if job.validation_file_key else None
        context = MethodContext(record=record, models=models, placement=placement)
        # On the device, or on the host where the recipe shards it onto the devices (FSDP2).
        model = training_base_model(method, replace(context, placement=parallel.load_placement(placement)))
    except ModelUnavailable as exc:
        raise TrainingError(str(exc), code=ErrorCode.model_unavailable) from None
    except MethodUnavailable as exc:
        raise TrainingError(str(exc), code=ErrorCode.method_unavailable) from None
    return TrainingRecipe(
        method,
        hyperparameters,
        model=model,
        tokenizer=tokenizer,
        context=context,
        train=train,
        valid=valid,
        reporter=reporter,
        limits=recipe_limits(settings),
        stop=stop,
        checkpointer=checkpointer,
        name=f"job {job.id}",
        objective=objective_of(job.hyperparameters),
        start_from=start_from,
        parallel=parallel,
        **(sweep_rungs(settings, job, reporter) if parallel.is_first else {}),
    )


def sweep_rungs(settings: Settings, job: ClaimedJob, reporter: Reporter) -> dict[str, Any]:
    """For a job that trains one of a sweep's configurations, the recipe's `evaluate_at` (the rungs of the sweep's
    successive halving) and `prune`: at each rung, record its validation loss and say whether it stops there
    (app/sweeps/service.py). Nothing for any other job."""
    with session_scope(settings.db_url) as session:
        metadata = session.scalar(select(Job.user_metadata).where(Job.id == job.id)) or {}
        sweep_id, position = metadata.get("sweep_id"), metadata.get("sweep_position")
        spec = session.scalar(select(Sweep.spec).where(Sweep.id == sweep_id)) if sweep_id else None
    if sweep_id is None or spec is None or not spec.get("rungs") or not str(position).isdigit():
        return {}
    sweep: str = sweep_id
    place = int(str(position))
    rungs, eta = set(spec["rungs"]), spec["early_elimination"]["eta"]

    def prune(step: int, loss: float) -> bool:
        if step not in rungs:
            return False
        with session_scope(settings.db_url) as session:
            stop, rank, reached = rung_decision(session, sweep_id=sweep, position=place, step=step, value=loss)
            if stop:
                session.execute(
                    update(SweepTrial)
                    .where(SweepTrial.sweep_id == sweep, SweepTrial.position == place)
                    .values(stopped_early_at=step)
                )
        verdict = "stops here" if stop else "goes on"
        reporter.event(
            "log",
            f"sweep {sweep_id}, rung at step {step}: valid loss {loss:.4f} ranks {rank} of the {reached} "
            f"configuration(s) that reached it; the best {math.ceil(reached / eta)} go on, so this one {verdict}",
            {"step": step, "sweep_id": sweep_id, "rank": rank, "reached": reached, "stopped_early": stop},
        )
        return stop

    return {"prune": prune, "evaluate_at": rungs}


@contextmanager
def starting_weights(settings: Settings, storage: ObjectStorage, job: ClaimedJob) -> Iterator[Path | None]:
    """The artifact of the adapter or checkpoint the job continues from, unpacked in a temporary folder while the
    context lasts (the recipe's setup reads it); None for a job that starts from its base model."""
    source = init_from(job.hyperparameters)
    if source is None:
        yield None
        return
    gone = TrainingError(
        f"{source}, the fine-tuned model this job continues from, was deleted or its stored files are missing or "
        "damaged; create the job again from another one",
        code=ErrorCode.adapter_unavailable,
    )
    try:
        with session_scope(settings.db_url) as session:
            row = get_servable(session, tenant_id=job.tenant_id, adapter_id=source)
            key, sha256 = row.storage_key, row.sha256
    except NotFound:
        raise gone from None
    try:
        with adapter_format.fetched(storage, key, sha256, settings.tmp_dir) as folder:
            yield folder
    except adapter_format.StoredArtifactUnavailable:
        raise gone from None
