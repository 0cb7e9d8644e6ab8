"""Where models run: the device and dtype from TUNEFORGE_DEVICE / TUNEFORGE_DTYPE, resolved once per process.

`auto` takes the first CUDA device (of those CUDA_VISIBLE_DEVICES shows) in bfloat16 where the GPU supports it,
else the CPU in float32. The worker and the serving engine both place models and batches with this.
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass
from typing import Any

DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:\d{1,3})?)$"
DTYPES = ("auto", "float32", "bfloat16", "float16")


class PlacementError(RuntimeError):
    """The configured device or dtype is not available on this machine."""


@dataclass(frozen=True)
class Placement:
    device: Any  # torch.device
    dtype: Any  # torch.dtype
    device_name: str  # the GPU's name, or the CPU's architecture

    @property
    def device_str(self) -> str:
        return str(self.device)

    @property
    def dtype_str(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def mixed_precision(self) -> bool:
        """Half-precision weights and activations: trainable weights stay float32 under autocast."""
        import torch

        return bool(self.dtype != torch.float32)

    def describe(self) -> str:
        return f"{self.device_str} ({self.device_name}), {self.dtype_str}"

    def autocast(self) -> Any:
        """The forward pass's autocast context: half-precision matmuls over float32 trainable weights."""
        import torch

        return torch.autocast(device_type=self.device.type, dtype=self.dtype, enabled=self.mixed_precision)


def cuda_training_available(device: str) -> bool:
    """Whether a process configured with `device` (auto|cpu|cuda[:N]|mps) trains on CUDA with bitsandbytes (what
    the qlora method needs)."""
    import importlib.util

    if device in ("cpu", "mps") or importlib.util.find_spec("bitsandbytes") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def resolve_placement(device: str = "auto", dtype: str = "auto") -> Placement:
    """The placement the settings ask for, or PlacementError saying why this machine cannot give it."""
    import torch

    if not re.match(DEVICE_PATTERN, device):
        raise PlacementError(f"TUNEFORGE_DEVICE={device!r} is not one of auto, cpu, cuda, cuda:N, mps")
    if dtype not in DTYPES:
        raise PlacementError(f"TUNEFORGE_DTYPE={dtype!r} is not one of {', '.join(DTYPES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise PlacementError(
                f"TUNEFORGE_DEVICE={device} but no CUDA device is visible (a CPU build of torch, no driver, "
                "or CUDA_VISIBLE_DEVICES empty); use TUNEFORGE_DEVICE=cpu or auto"
            )
        index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise PlacementError(
                f"TUNEFORGE_DEVICE={device} but only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
        torch_device = torch.device("cuda", index)
        name = torch.cuda.get_device_name(index)
    elif device == "mps":
        if not torch.backends.mps.is_available():
            raise PlacementError("TUNEFORGE_DEVICE=mps but this machine has no Apple MPS device")
        torch_device, name = torch.device("mps"), "Apple MPS"
    else:
        torch_device, name = torch.device("cpu"), f"{platform.machine() or 'cpu'}, {torch.get_num_threads()} threads"

    if dtype == "auto":
        bf16 = torch_device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        torch_dtype = torch.bfloat16 if bf16 else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    return Placement(device=torch_device, dtype=torch_dtype, device_name=name)


@dataclass(frozen=True)
class WorkerDevices:
    """What TUNEFORGE_WORKER_DEVICES gives a worker: `count` devices, CUDA's by index or the first ones it sees."""

    count: int
    cuda_indices: tuple[int, ...] | None = None

    @classmethod
    def parse(cls, value: str) -> WorkerDevices:
        """ "4" (a count) or "0,1,2,3" (CUDA indices); PlacementError if it is neither."""
        parts = value.split(",")
        if not all(part.strip().isdigit() for part in parts):
            raise PlacementError(
                f"TUNEFORGE_WORKER_DEVICES={value!r} is neither a count (4) nor CUDA indices (0,1,2,3)"
            )
        if len(parts) == 1:
            count = int(parts[0])
            if count < 1:
                raise PlacementError("TUNEFORGE_WORKER_DEVICES: a worker owns at least 1 device")
            return cls(count)
        indices = tuple(int(part) for part in parts)
        if len(set(indices)) != len(indices):
            raise PlacementError(f"TUNEFORGE_WORKER_DEVICES={value!r} names a device twice")
        return cls(len(indices), indices)
