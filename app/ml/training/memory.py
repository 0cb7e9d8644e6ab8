"""Memory: the micro-batch token budget a device holds, and host memory given back after a job."""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable

import psutil
import torch
from torch import nn

from app.ml.device import Placement

# Bytes a token in flight holds per layer and hidden unit, in the model's dtype element size (saved activations
# of the attention and MLP blocks, and the allocator's slack): LoRA on q/v of SmolLM2-135M in float32 (30 layers
# x 576) measured about 1.9 MiB a token (bench/training.py --memory-job, then on q/v), which 32 x 30 x 576 x 4
# bytes = 2.1 MiB covers. What the adapted modules keep is counted apart (adapter_activation_units).
ACTIVATION_BYTES_PER_LAYER_UNIT = 32
MEMORY_SHARE = 0.5  # of the device's free memory, for one micro-batch's activations
MIN_BATCH_TOKENS = 64
# On a CPU a micro-batch of 1024 tokens trains as many tokens a second as one of 2048 (bench/training.py: 63.7
# and 63.3 useful tokens/s for LoRA on SmolLM2-135M, 2 cores) for 1 GB less memory: the matrices are already
# big enough to keep the cores busy. A GPU gains from more, and takes the whole budget.
CPU_MICRO_BATCH_TOKENS = 1024
# And on a CPU a packed micro-batch's activations stay within this many bytes by the estimate below, whatever the
# adapted modules keep: LoRA with dropout on all seven linear layers of SmolLM2-135M keeps a quarter more a token than
# on q/v, and its batch-48 job went past 4 GB in micro-batches of 1,024 tokens (bench/training.py --memory-job).
CPU_MICRO_BATCH_BYTES = 2 * 2**30


def adapter_activation_units(model: nn.Module) -> int:
    """Activation elements a token keeps for the backward pass in the model's LoRA layers, all layers together:
    each adapted module keeps its input (in_features; without dropout shared at most with its neighbours, counted
    whole all the same) and its rank-r projection; under dropout its input's dropped copy and the dropout's mask
    (a byte an element: a quarter more in float32). LoRA on every linear layer of a LLaMA block keeps
    6 x hidden + intermediate + 7 r a token, several times what it keeps on q/v alone."""
    from peft.tuners.lora import LoraLayer

    units = 0
    for module in model.modules():
        if not (isinstance(module, LoraLayer) and module.active_adapters):
            continue
        inputs = int(getattr(module, "in_features", 0) or 0)
        for name in module.active_adapters:
            if name not in module.r:
                continue
            dropout = module.lora_dropout[name]
            dropped = isinstance(dropout, nn.Dropout) and dropout.p > 0
            units += inputs + inputs // 4 * dropped + int(module.r[name])
    return units


def activation_bytes_per_token(model: nn.Module, placement: Placement) -> int:
    """The bytes one token in flight holds: the base model's saved activations (ACTIVATION_BYTES_PER_LAYER_UNIT a
    layer and hidden unit), and what its adapted modules keep on top (`adapter_activation_units`)."""
    config = model.config  # type: ignore[union-attr]
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    element = torch.empty((), dtype=placement.dtype).element_size()
    return (ACTIVATION_BYTES_PER_LAYER_UNIT * layers * hidden + adapter_activation_units(model)) * element


def micro_batch_budget(model: nn.Module, placement: Placement, limit: int, *, packed: bool = False) -> int:
    """The micro-batch token budget: the configured limit, or less where the device's free memory would not
    hold that many tokens' activations (a smaller machine, a bigger model, more adapted modules), and for packed
    rows on a CPU at most CPU_MICRO_BATCH_TOKENS and CPU_MICRO_BATCH_BYTES of activations (padded micro-batches
    keep the limit: cut smaller, they pad more). An example longer than the budget (up to the limit, which the API
    checks) still trains, in a micro-batch of its own."""
    config = model.config  # type: ignore[union-attr]
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    if not (layers and hidden):
        return min(limit, CPU_MICRO_BATCH_TOKENS) if packed and placement.device.type == "cpu" else limit
    per_token = activation_bytes_per_token(model, placement)
    if packed and placement.device.type == "cpu":
        limit = min(limit, CPU_MICRO_BATCH_TOKENS, max(MIN_BATCH_TOKENS, CPU_MICRO_BATCH_BYTES // per_token))
    if placement.device.type == "cuda":
        free = torch.cuda.mem_get_info(placement.device)[0]
    else:
        free = psutil.virtual_memory().available
    return max(MIN_BATCH_TOKENS, min(limit, int(free * MEMORY_SHARE / per_token)))


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


_MALLOC_TRIM = _malloc_trim()


def return_freed_memory() -> None:
    """Give the host memory freed by a finished job back to the system (glibc keeps it otherwise, and an idle
    worker would hold its last job's peak). Not after every micro-batch: the next one would fault the pages
    back in, which made a step 30% slower on a CPU (measured with bench/training.py)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def release_device_memory() -> None:
    """Give the memory of a finished job (above all a failed one) back, so that the next job has all of it."""
    gc.collect()
    return_freed_memory()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
