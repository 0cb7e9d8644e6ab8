"""What a job will store, estimated before it runs: its kept checkpoints (each an artifact and a training state)
and its final artifact. `POST /jobs` reserves this against the tenant's storage quota, so that jobs queued
together cannot each count on the same free room.

The estimate counts the parameters the method trains on a model built on PyTorch's meta device from the base
model's config (no weights read, no memory allocated), and prices them as the recipe stores them: trained tensors
in float32 in an artifact (4 bytes each); in a training state the same tensors and AdamW's two moments (12 bytes
each). Counting the same way the recipe does (`method.prepare`, then `method.param_groups`) keeps the two in step
for every method, present and future.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass

from app.ml.hyperparameters import TrainingHyperparameters
from app.ml.methods import METHODS
from app.ml.models import ModelRecord, ModelStore

ARTIFACT_BYTES_PER_PARAMETER = 4  # float32
STATE_BYTES_PER_PARAMETER = 12  # the float32 tensor and AdamW's two float32 moments
# An artifact's config, manifest and archive headers; a state's position, metrics, scheduler and RNG states.
OVERHEAD_BYTES = 64 * 1024
CACHED = 256  # estimates kept per process (one per base model, method and the method's own hyperparameters)


@dataclass(frozen=True)
class Footprint:
    trained_parameters: int
    keep_checkpoints: int

    @property
    def artifact_bytes(self) -> int:
        return self.trained_parameters * ARTIFACT_BYTES_PER_PARAMETER + OVERHEAD_BYTES

    @property
    def state_bytes(self) -> int:
        return self.trained_parameters * STATE_BYTES_PER_PARAMETER + OVERHEAD_BYTES

    @property
    def stored_bytes(self) -> int:
        """The most the job keeps at once: its latest checkpoints and its final artifact (once it ends, the
        checkpoints' training states are dropped and it keeps less)."""
        return self.keep_checkpoints * (self.artifact_bytes + self.state_bytes) + self.artifact_bytes


def _key(record: ModelRecord, method: str, hp: TrainingHyperparameters) -> tuple[str, str, str, str]:
    """What decides the trained parameters: the model, the method and the method's own hyperparameters (its rank,
    targets, virtual tokens...), not those every method shares (epochs, learning rate, checkpoints kept...)."""
    own = hp.model_dump_json(exclude=set(TrainingHyperparameters.model_fields))
    return (record.id, record.revision, method, own)


_lock = threading.Lock()
_estimates: OrderedDict[tuple[str, str, str, str], int] = OrderedDict()  # trained parameters


def cached(record: ModelRecord, method: str, hp: TrainingHyperparameters) -> Footprint | None:
    """The footprint if this process estimated it already (cheap: no model is built)."""
    key = _key(record, method, hp)
    with _lock:
        found = _estimates.get(key)
        if found is not None:
            _estimates.move_to_end(key)
    if found is None:
        return None
    return Footprint(trained_parameters=found, keep_checkpoints=hp.keep_checkpoints)


def estimate(models: ModelStore, record: ModelRecord, method: str, hp: TrainingHyperparameters) -> Footprint:
    """Build the base model on the meta device, let the method prepare it, and count what its optimizer groups
    hold: a second to a few seconds for a model of billions of parameters, and no memory for its weights. Kept."""
    import torch
    from transformers import AutoModelForCausalLM

    from app.ml.device import Placement
    from app.ml.methods.base import MethodContext

    found = cached(record, method, hp)
    if found is not None:
        return found
    trainer = METHODS[method]
    meta = torch.device("meta")
    context = MethodContext(
        record=record, models=models, placement=Placement(device=meta, dtype=torch.float32, device_name="meta")
    )
    # A throwaway model: what transformers and PEFT warn about while building it is nothing a user could act on.
    with meta, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(models.config(record))
        prepared = trainer.prepare(model, hp, context)
        groups = trainer.param_groups(prepared, hp)
    trained = {id(param): param.numel() for group in groups for param in group["params"]}
    with _lock:
        _estimates[_key(record, method, hp)] = sum(trained.values())
        while len(_estimates) > CACHED:
            _estimates.popitem(last=False)
    return Footprint(trained_parameters=sum(trained.values()), keep_checkpoints=hp.keep_checkpoints)
