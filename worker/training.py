"""A claimed job as a training recipe: its files read from the object store, its base model and tokenizer on
the worker's device, its progress to the job's row, its checkpoints to the object store."""

from __future__ import annotations

import logging

import torch

from app.core.error_codes import ErrorCode
from app.core.settings import Settings
from app.core.storage import ObjectStorage
from app.jobs.state import ClaimedJob
from app.ml.device import PlacementError, resolve_placement
from app.ml.methods import METHODS
from app.ml.methods.base import MethodContext, MethodUnavailable
from app.ml.models import ModelRecord, ModelStore, ModelUnavailable
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
from worker.lifecycle import stop_requested

log = logging.getLogger(__name__)


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
    *,
    stop: StopSignal = stop_requested,
) -> TrainingRecipe:
    """The recipe that trains `job` on this worker (set up by `recipe.setup`), or a TrainingError the user can
    act on (device, base model or method unavailable; unreadable data)."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    try:
        placement = resolve_placement(settings.device, settings.dtype)
    except PlacementError as exc:
        log.error("job %s: %s", job.id, exc)
        raise TrainingError(
            "the worker that took this job cannot use its configured device; the operator's worker log has the details",
            code=ErrorCode.device_unavailable,
        ) from None
    method = METHODS[job.method]
    hyperparameters = method.hyperparameters.model_validate(job.hyperparameters)
    models = ModelStore(settings.models_dir, storage)
    try:
        tokenizer = models.tokenizer(record)
        train = read_examples(storage, job.training_file_key)
        valid = read_examples(storage, job.validation_file_key) if job.validation_file_key else None
        context = MethodContext(record=record, models=models, placement=placement)
        model = training_base_model(method, context)
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
    )
