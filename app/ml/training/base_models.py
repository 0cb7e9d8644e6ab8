"""The base model a job trains: loaded once per process into host memory, and a private copy for each job.

The copy's modules and parameters are its own, but on the cache's device (a CPU) its weights share the cached
tensors: the base model is held once, not twice. Whatever a job trains gets its own tensors first
(`own_trained_tensors`), so the cached weights are never changed.
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.ml.device import Placement
from app.ml.methods.base import FineTuningMethod, MethodContext
from app.ml.models import ModelRecord, ModelStore

_base_models: dict[tuple[str, str, Path, torch.dtype], nn.Module] = {}
_base_lock = threading.Lock()


def cached_base_model(models: ModelStore, record: ModelRecord, placement: Placement) -> nn.Module:
    """A private copy of the base model on the placement's device and in its dtype; the pristine one stays
    cached in host memory between jobs (one copy per worker, whatever the device).

    The copy's modules and parameters are its own, but on the cache's device (a CPU) its weights share the
    cached tensors: the base model is held once, not twice. Whatever a job trains gets its own tensors first
    (`own_trained_tensors`), so the cached weights are never changed."""
    with _base_lock:
        key = (record.id, record.revision, models.models_dir, placement.dtype)
        if key not in _base_models:
            _base_models.clear()  # one base model at a time: a worker that switches models does not hoard them
            cpu = Placement(device=torch.device("cpu"), dtype=placement.dtype, device_name="cpu")
            _base_models[key] = models.load(record, cpu)
        cached = _base_models[key]
        memo: dict[int, Any] = {id(p): nn.Parameter(p.data, requires_grad=p.requires_grad) for p in cached.parameters()}
        memo.update({id(b): b for b in cached.buffers()})  # never written (rotary frequencies)
        return copy.deepcopy(cached, memo).to(placement.device)


def own_trained_tensors(params: list[nn.Parameter]) -> None:
    """Give each parameter a job will update that still shares a cached base model's memory a copy of its own."""
    with _base_lock:
        cached = {p.untyped_storage().data_ptr() for model in _base_models.values() for p in model.parameters()}
    for param in params:
        if param.untyped_storage().data_ptr() in cached:
            param.data = param.data.clone()


def training_base_model(method: FineTuningMethod, context: MethodContext) -> nn.Module:
    """The base model `method` trains: its own (QLoRA: quantized), or a copy of the cached one."""
    return method.load_base(context) or cached_base_model(context.models, context.record, context.placement)
