"""How a recipe's steps are shared among processes: one process on one device (`OneProcess`), or one of several
ranks of a `torch.distributed` group, each on its own device, started by `torchrun` (the worker's
worker/ranks.py, or a script).

- `DataParallel`: PyTorch's DDP. Every rank holds the whole model; what trains (an adapter, the output layer)
  is small. A step's examples are dealt out among the ranks, and DDP averages the gradients.
- `ShardedDataParallel`: PyTorch's FSDP2 (`fully_shard`), for full fine-tuning and for any method on a base model
  too large for one device (`shards`): weights, gradients and optimizer state are sharded, each decoder layer
  gathered only while it computes.

Either way a step's loss and gradients are those of the single-process run over the same global batch: each
rank's token losses are divided by the whole step's loss-bearing tokens (which every rank knows: each has all
the data), and every rank runs the same number of micro-batches (a rank with fewer repeats one with weight 0), as
the collectives of DDP's and FSDP's backward and FSDP's forward passes require.

A checkpoint is the same as a single process's (`TrainingRecipe.state_dict`): full tensors, the optimizer's state
keyed as one process keys it. So a run checkpointed on N ranks resumes on any M. Decisions a rank could make on
its own (stop now, checkpoint now: a clock, a signal) are rank 0's, broadcast (`agree`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from app.ml.device import Placement

T = TypeVar("T")
Plan = Callable[[list[Any]], list[Any]]


class OneProcess:
    """The recipe alone on one device: nothing is shared."""

    rank = 0
    world_size = 1
    kind = "one process"
    distributed = False  # one rank of a torch.distributed group (possibly of one)

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return self.kind

    def micro_batches(self, examples: list[Any], plan: Plan) -> list[tuple[Any, float]]:
        """This rank's micro-batches of a step's (or an evaluation's) `examples` as `plan` groups them, each with
        its weight in the step's gradients (0 for a pass only run to keep the ranks' collectives in step)."""
        return [(group, 1.0) for group in plan(examples)]

    def forward(self, model: nn.Module, compute: Callable[..., T], *args: Any) -> T:
        """`compute(model, *args)`, through the data-parallel wrapper that syncs its gradients where there is one."""
        return compute(model, *args)

    def syncing(self, last: bool) -> contextlib.AbstractContextManager[None]:
        """Around a micro-batch's backward pass: the gradients are exchanged only after the step's last one."""
        return contextlib.nullcontext()

    def gradient_scale(self) -> float:
        """What a rank's share of the loss is multiplied by so that averaging over the ranks gives the sum."""
        return 1.0

    def total(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over the ranks."""
        return values

    def agree(self, flag: bool) -> bool:
        """Rank 0's `flag`, on every rank."""
        return flag

    def share(self, value: T) -> T:
        """Rank 0's `value` (a picklable object), on every rank."""
        return value

    def least(self, value: int) -> int:
        """The smallest of the ranks' `value`s, on every rank."""
        return value

    def load_placement(self, placement: Placement) -> Placement:
        """Where the base model is loaded before `wrap`: the device itself, except when it is sharded."""
        return placement

    def wrap(self, model: nn.Module) -> None:
        """Once the model is prepared and its starting weights loaded: make it data parallel."""

    def rewrap(self, model: nn.Module) -> None:
        """The method changed what trains (layer-wise unfreezing): follow it."""

    def gathered(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        """While it lasts, the model's parameters are whole (for reading: export, snapshots)."""
        return contextlib.nullcontext()

    def load_trained(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Full tensors, by name, copied into the model's (possibly sharded) parameters."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor)

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)


class DataParallel(OneProcess):
    """DDP over the ranks of the default process group (`torchrun` set it up: `init_process_group`)."""

    kind = "DDP"
    distributed = True

    def __init__(self, device: torch.device) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        # Collectives of small tensors (flags, sums) go on the device the backend serves: NCCL's on the GPU.
        self.device = device if dist.get_backend() == "nccl" else torch.device("cpu")
        self.wrapper: nn.Module | None = None

    def describe(self) -> str:
        return f"{self.kind} over {self.world_size} ranks ({dist.get_backend()})"

    def micro_batches(self, examples: list[Any], plan: Plan) -> list[tuple[Any, float]]:
        # Every rank plans every rank's share (they all hold the step's examples): the counts agree without asking.
        plans = [plan(examples[rank :: self.world_size]) for rank in range(self.world_size)]
        mine = plans[self.rank]
        passes = max(len(groups) for groups in plans)
        filler = mine[0] if mine else plan(examples[:1])[0]
        return [(group, 1.0) for group in mine] + [(filler, 0.0)] * (passes - len(mine))

    def forward(self, model: nn.Module, compute: Callable[..., T], *args: Any) -> T:
        assert self.wrapper is not None, "wrap() the model first"
        return self.wrapper(compute, *args)  # type: ignore[no-any-return]

    def syncing(self, last: bool) -> contextlib.AbstractContextManager[None]:
        if last or self.wrapper is None:
            return contextlib.nullcontext()
        return self.wrapper.no_sync()  # type: ignore[operator, no-any-return]

    def gradient_scale(self) -> float:
        return float(self.world_size)

    def total(self, values: torch.Tensor) -> torch.Tensor:
        summed = values.to(self.device)
        dist.all_reduce(summed)
        return summed.to(values.device)

    def agree(self, flag: bool) -> bool:
        value = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(value, src=0)
        return bool(value.item())

    def least(self, value: int) -> int:
        smallest = torch.tensor([value], device=self.device)
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
        return int(smallest.item())

    def share(self, value: T) -> T:
        box = [value if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]  # type: ignore[return-value]

    def wrap(self, model: nn.Module) -> None:
        # Rank 0's trained weights on every rank (its starting weights and resumed state are what count), then
        # DDP over the parameters that train now. The frozen base is the same everywhere: not broadcast.
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    synced = param.data.to(self.device)
                    dist.broadcast(synced, src=0)
                    param.data.copy_(synced)
        self.rewrap(model)

    def rewrap(self, model: nn.Module) -> None:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [model_device(model)] if model_device(model).type == "cuda" else None
        self.wrapper = DistributedDataParallel(Forward(model), device_ids=device_ids, init_sync=False)


class ShardedDataParallel(DataParallel):
    """FSDP2: each decoder layer (the model's `_no_split_modules`, as transformers names them) and then the rest
    sharded across the ranks."""

    kind = "FSDP2"

    def load_placement(self, placement: Placement) -> Placement:
        """The host: `fully_shard` moves each layer to the device as it shards it, so that a device never holds
        more than its shard and one layer whole (a base model larger than one device trains)."""
        return dataclasses.replace(placement, device=torch.device("cpu"))

    def wrap(self, model: nn.Module) -> None:
        from torch.distributed.fsdp import fully_shard

        # Every rank shards the same full tensors: rank 0's, so that its starting weights and resumed state count.
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                synced = tensor.data.to(self.device)
                dist.broadcast(synced, src=0)
                tensor.data.copy_(synced)
        layer_classes = set(getattr(model, "_no_split_modules", None) or ())
        layers = [module for module in model.modules() if type(module).__name__ in layer_classes]
        if not layers:
            raise ValueError(f"{type(model).__name__} names no layer class to shard (_no_split_modules)")
        for layer in layers:
            fully_shard(layer)
        self.wrapper = Forward(model)
        fully_shard(self.wrapper)

    def rewrap(self, model: nn.Module) -> None:
        pass  # FSDP2 shards every parameter, trained or not: nothing to follow

    def syncing(self, last: bool) -> contextlib.AbstractContextManager[None]:
        assert self.wrapper is not None
        self.wrapper.set_requires_gradient_sync(last)  # type: ignore[operator]
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def gathered(self, model: nn.Module) -> Iterator[None]:
        from torch.distributed.fsdp import FSDPModule

        assert self.wrapper is not None
        sharded = [module for module in self.wrapper.modules() if isinstance(module, FSDPModule)]
        for module in sharded:
            module.unshard()
        try:
            yield
        finally:
            for module in sharded:
                module.reshard()

    def load_trained(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        assert self.wrapper is not None
        full: dict[str, Any] = {f"{Forward.PREFIX}{name}": tensor for name, tensor in tensors.items()}
        set_model_state_dict(self.wrapper, full, options=StateDictOptions(full_state_dict=True, strict=False))

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's state gathered whole on rank 0 (torch.distributed.checkpoint), keyed as one process keys
        it; empty on the other ranks."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        assert self.wrapper is not None
        full = get_optimizer_state_dict(
            self.wrapper, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return by_index(full) if self.rank == 0 else {}  # gathered on rank 0 only: only it saves checkpoints

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        assert self.wrapper is not None
        names = [f"{Forward.PREFIX}{name}" for name in parameter_names(model, optimizer)]
        set_optimizer_state_dict(
            self.wrapper, optimizer, by_name(state, names), options=StateDictOptions(full_state_dict=True)
        )


class Forward(nn.Module):
    """The model behind one `forward(compute, *args)`: what DDP and FSDP wrap, so that every way a recipe calls
    the model (the decoder and output layer apart, the PEFT model whole, a DPO pair) runs inside their hooks."""

    PREFIX = "model."

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, compute: Callable[..., Any], *args: Any) -> Any:
        return compute(self.model, *args)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters in its own order (group by group): a single process's state keys
    them by position in this order."""
    names = {id(param): name for name, param in model.named_parameters()}
    return [names[id(param)] for group in optimizer.param_groups for param in group["params"]]


def by_index(full: dict[str, Any]) -> dict[str, Any]:
    """torch.distributed.checkpoint's optimizer state (keyed by parameter name) as `Optimizer.state_dict()` keys
    it: by position, group after group."""
    names = [name for group in full["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(names)}
    return {
        "state": {index[name]: value for name, value in full["state"].items()},
        "param_groups": [
            {**group, "params": [index[name] for name in group["params"]]} for group in full["param_groups"]
        ],
    }


def by_name(state: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """The inverse of `by_index`: a single process's optimizer state keyed by the parameters' `names`."""
    return {
        "state": {names[int(i)]: value for i, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [names[int(i)] for i in group["params"]]} for group in state["param_groups"]
        ],
    }


# A base model whose weights take more than this share of one GPU's memory is sharded (FSDP2) whatever the method:
# what is left would not hold the activations, the adapter and its optimizer.
SHARD_ABOVE_DEVICE_SHARE = 0.5


def shards(*, trains_every_weight: bool, n_parameters: int, placement: Placement) -> bool:
    """Whether a run is sharded (FSDP2) rather than replicated (DDP): full fine-tuning (its optimizer state is
    12 bytes a parameter beside the weights), or a base model too large for one GPU to hold with room to train."""
    if trains_every_weight:
        return True
    if placement.device.type != "cuda":
        return False
    weights = n_parameters * torch.empty((), dtype=placement.dtype).element_size()
    return weights > SHARD_ABOVE_DEVICE_SHARE * torch.cuda.get_device_properties(placement.device).total_memory


def from_environment(device: torch.device, *, sharded: bool) -> OneProcess:
    """The parallelism `torchrun` set this process up for (RANK, WORLD_SIZE in the environment): one process when
    it did not start this one; else the process group is joined (gloo on a CPU, NCCL on CUDA) and DDP or,
    `sharded`, FSDP2 (even over one rank: what proves the path on a machine with one GPU)."""
    if "WORLD_SIZE" not in os.environ:
        return OneProcess()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # FSDP2's default mesh, and NCCL's, take the current device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=_device_id(device))
    return ShardedDataParallel(device) if sharded else DataParallel(device)


def _device_id(device: torch.device) -> torch.device | None:
    return device if device.type == "cuda" else None


ONE_PROCESS = OneProcess()
