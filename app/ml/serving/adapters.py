"""Adapters for the engine: fetched lazily, converted once into what a batch applies, kept in a byte-budgeted LRU.

Where an adapter is, from nearest to farthest:
1. device memory: the converted form the engine applies (`Servable`), least recently used first, within
   `device_bytes`; adapters in the running batch are pinned and never evicted;
2. host memory (only when the device is not the CPU): the same tensors on the CPU, within `host_bytes`;
3. the local disk: the unpacked artifact under `cache_dir`, within `disk_bytes` (least recently used go);
4. the object store: the published archive, checked against its sha256.
Fetching and reading files (3-4 to 2) runs on loader threads, once per adapter however many requests wait for it;
what needs the model (DoRA's weight norms, prompt-learning prompts, weight-delta copies) runs on the engine thread.
A missing or damaged adapter fails only the requests that asked for it.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import threading
import uuid
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.core.storage import ObjectStorage
from app.ml import adapter_format
from app.ml.serving.layers import LoraWeights
from app.ml.serving.requests import AdapterRef, AdapterUnavailable

if TYPE_CHECKING:
    from torch import nn

    from app.ml.methods.delta import Delta

log = logging.getLogger(__name__)

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


@dataclass
class HostAdapter:
    """An adapter read from its files, before anything that needs the model."""

    ref: AdapterRef
    folder: Path
    lora: dict[str, tuple[Any, Any, float, Any]] = field(default_factory=dict)  # layer -> (A, B, scaling, magnitude)
    ia3: dict[str, tuple[Any, bool]] = field(default_factory=dict)  # layer -> (vector, feedforward)
    delta: Delta | None = None

    @property
    def n_bytes(self) -> int:
        tensors = [t for a, b, _, m in self.lora.values() for t in (a, b, m) if t is not None]
        tensors += [v for v, _ in self.ia3.values()]
        size = sum(t.numel() * t.element_size() for t in tensors)
        return size + (self.delta.n_bytes if self.delta is not None else 0)


@dataclass
class Servable:
    """An adapter as the engine applies it, on the serving device."""

    ref: AdapterRef
    layers: dict[str, LoraWeights | tuple[Any, bool]] = field(default_factory=dict)  # LoRA / IA3, per linear layer
    soft_prompt: Any = None  # prompt / p-tuning: [virtual tokens, hidden] embeddings before the text's
    prefix: list[tuple[Any, Any]] | None = None  # prefix tuning: per layer keys and values, [1, heads, n, dim]
    delta_model: nn.Module | None = None  # weight deltas: a copy of the base model sharing its untouched tensors
    n_bytes: int = 0

    @property
    def virtual_tokens(self) -> int:
        if self.soft_prompt is not None:
            return int(self.soft_prompt.shape[0])
        if self.prefix is not None:
            return int(self.prefix[0][0].shape[-2])
        return 0


def read_adapter(ref: AdapterRef, folder: Path, *, weights_sha256: str, dtype: Any) -> HostAdapter:
    """Read an unpacked artifact's tensors onto the CPU (a loader thread: no model needed)."""
    from safetensors.torch import load_file

    from app.ml.methods import METHODS
    from app.ml.methods.base import PeftMethod
    from app.ml.methods.delta import load_delta

    method = METHODS[ref.method]
    host = HostAdapter(ref=ref, folder=folder)
    if not isinstance(method, PeftMethod):
        host.delta = load_delta(folder, weights_sha256=weights_sha256, device="cpu", dtype=dtype)
        return host
    if method.serving not in ("lora", "ia3"):
        return host  # prompt learning: PEFT computes the prompts from the folder, on the engine thread
    config = json.loads((folder / PEFT_CONFIG).read_text())
    tensors = load_file(str(folder / PEFT_WEIGHTS))
    if method.serving == "ia3":
        for key, vector in tensors.items():
            name = key.removeprefix(PEFT_PREFIX).removesuffix(".ia3_l")
            host.ia3[name] = (vector.flatten(), vector.shape[0] == 1)  # feed-forward: [1, in]; else [out, 1]
        return host
    alpha, rslora = float(config["lora_alpha"]), bool(config.get("use_rslora"))
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
        b = tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"]
        rank = a.shape[0]
        module_alpha = float(config.get("alpha_pattern", {}).get(name.rsplit(".", 1)[-1], alpha))
        scaling = module_alpha / (rank**0.5 if rslora else rank)
        host.lora[name] = (a, b, scaling, tensors.get(f"{PEFT_PREFIX}{name}.lora_magnitude_vector"))
    return host


def materialize(host: HostAdapter, plain: Any, hook_ids: dict[str, tuple[int, int]], placement: Any) -> Servable:
    """The servable form, on the device (the engine thread: it reads the base model)."""
    import torch

    from app.ml.methods import METHODS

    device, dtype = placement.device, placement.dtype
    servable = Servable(ref=host.ref)
    if host.delta is not None:
        servable.delta_model = delta_model(plain, host.delta, hook_ids, device=device, dtype=dtype)
        servable.n_bytes = host.delta.n_bytes
        return servable
    if METHODS[host.ref.method].serving in ("soft_prompt", "prefix"):  # type: ignore[attr-defined]
        _prompts(servable, host.folder, plain, str(device))
    for name, (vector, feedforward) in host.ia3.items():
        servable.layers[name] = (vector.to(device=device, dtype=dtype), feedforward)
    with torch.no_grad():
        for name, (a, b, scaling, magnitude) in host.lora.items():
            a, b = a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)
            dora_scale = None
            if magnitude is not None:  # DoRA: magnitude / ||W + scaling B A|| per output, as PEFT computes it
                module = plain.get_submodule(name)
                weight = module.weight.to(dtype)
                if type(module).__name__ == "Conv1D":  # GPT-2 stores its weights transposed
                    weight = weight.T
                norm = torch.linalg.norm(weight + scaling * (b @ a), dim=1).to(weight.dtype)
                dora_scale = magnitude.to(device=device, dtype=dtype) / norm
            servable.layers[name] = LoraWeights(a=a, b=b, scaling=scaling, dora_scale=dora_scale)
    tensors = [servable.soft_prompt] if servable.soft_prompt is not None else []
    tensors += [t for kv in servable.prefix or [] for t in kv]
    for weights in servable.layers.values():
        if isinstance(weights, LoraWeights):
            tensors += [weights.a, weights.b] + ([weights.dora_scale] if weights.dora_scale is not None else [])
        else:
            tensors.append(weights[0])
    servable.n_bytes = sum(t.numel() * t.element_size() for t in tensors)
    return servable


def _prompts(servable: Servable, folder: Path, plain: Any, device: str) -> None:
    """Prompt-learning prompts, computed by PEFT from the artifact (it wraps the base model without changing it)."""
    import torch
    from peft import PeftModel

    if not (folder / PEFT_CONFIG).is_file():  # never let PEFT take a missing folder for a Hub repository id
        raise FileNotFoundError(folder / PEFT_CONFIG)
    wrapped = PeftModel.from_pretrained(plain, str(folder), adapter_name="serving", torch_device=device)
    with torch.no_grad():
        prompt = wrapped.get_prompt(batch_size=1)
    if wrapped.active_peft_config.peft_type.value == "PREFIX_TUNING":
        layers = getattr(prompt, "layers", None)
        if layers is not None:
            servable.prefix = [(layer.keys, layer.values) for layer in layers]
        else:
            servable.prefix = [(k, v) for k, v in prompt]
    else:
        servable.soft_prompt = prompt[0].to(plain.get_input_embeddings().weight.dtype)


def delta_model(
    plain: nn.Module, delta: Delta, hook_ids: dict[str, tuple[int, int]], *, device: Any, dtype: Any
) -> Any:
    """A copy of `plain` with the delta's tensors, sharing every other tensor with it (a `head` delta costs its
    output layer, not a model). Ties stay as they were in training: a tensor shared by two layers is replaced in
    both, and a tied output layer that the artifact trained alone gets its own weight."""
    import itertools

    from torch import nn

    from app.ml.methods.delta import DeltaMismatch

    params = dict(plain.named_parameters(remove_duplicate=False))
    unknown = [name for name in delta.tensors if name not in params]
    if unknown:
        raise DeltaMismatch(f"the base model has no tensor {unknown[0]}")
    output_name = delta.config.get("output_weight")
    untie = bool(delta.config.get("untied_output")) and output_name in delta.tensors
    replace: dict[int, nn.Parameter] = {}
    for name, tensor in delta.tensors.items():
        if params[name].shape != tensor.shape and not (untie and name == output_name):
            raise DeltaMismatch(f"{name} has shape {tuple(tensor.shape)}, the base model's {tuple(params[name].shape)}")
        if not (untie and name == output_name):
            replace[id(params[name])] = nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False)
    memo: dict[int, Any] = {id(t): t for t in itertools.chain(plain.parameters(), plain.buffers())}
    model: Any = copy.deepcopy(plain, memo)
    for module in model.modules():
        for key, param in list(module._parameters.items()):
            if param is not None and id(param) in replace:
                module._parameters[key] = replace[id(param)]
    if untie:
        assert output_name is not None
        weight = delta.tensors[output_name].to(device=device, dtype=dtype)
        model.get_output_embeddings().weight = nn.Parameter(weight, requires_grad=False)
    for name, (pre, post) in hook_ids.items():  # the copy serves its own rows only: no per-row adapters
        module = model.get_submodule(name)
        module._forward_pre_hooks.pop(pre, None)
        module._forward_hooks.pop(post, None)
    return model


class AdapterStore:
    """The disk and host tiers (and the loader threads) behind each base model's device tier (`DeviceAdapters`)."""

    def __init__(
        self,
        *,
        storage: ObjectStorage,
        cache_dir: Path,
        dtype: Any,
        host_bytes: int,
        disk_bytes: int,
        threads: int = 2,
    ) -> None:
        self.storage = storage
        self.dtype = dtype
        self.cache_dir = cache_dir
        self.host_bytes = host_bytes
        self.disk_bytes = disk_bytes
        self._host: OrderedDict[str, HostAdapter] = OrderedDict()
        self._loading: dict[str, Future[HostAdapter]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="adapter-loader")
        self.hits = self.misses = 0  # the local disk: unpacked already, or downloaded from the object store
        self.host_hits = self.host_misses = 0  # host memory: read already, or read from the disk now

    def fetch(self, ref: AdapterRef, *, weights_sha256: str) -> Future[HostAdapter]:
        """The adapter read into host memory: at once if it is there, else one load however many ask."""
        with self._lock:
            host = self._host.get(ref.id)
            if host is not None:
                self.host_hits += 1
                self._host.move_to_end(ref.id)
                done: Future[HostAdapter] = Future()
                done.set_result(host)
                return done
            self.host_misses += 1
            loading = self._loading.get(ref.id)
            if loading is None:
                loading = self._loading[ref.id] = self._pool.submit(self._load, ref, weights_sha256)
            return loading

    def keep_on_host(self, host: HostAdapter) -> None:
        with self._lock:
            self._host[host.ref.id] = host
            self._host.move_to_end(host.ref.id)
            while len(self._host) > 1 and sum(h.n_bytes for h in self._host.values()) > self.host_bytes:
                self._host.popitem(last=False)

    def host_bytes_used(self) -> int:
        with self._lock:
            return sum(h.n_bytes for h in self._host.values())

    def _load(self, ref: AdapterRef, weights_sha256: str) -> HostAdapter:
        try:
            folder = self._local(ref)
            try:
                return read_adapter(ref, folder, weights_sha256=weights_sha256, dtype=self.dtype)
            except AdapterUnavailable:
                raise
            except Exception as exc:  # a damaged artifact fails its own requests only
                from app.ml.methods.delta import DeltaMismatch

                if isinstance(exc, DeltaMismatch):
                    raise AdapterUnavailable(ref.id, f"it cannot be applied to its base model: {exc}") from None
                log.exception("adapter %s could not be read", ref.id)
                raise AdapterUnavailable(ref.id, "its stored files could not be read") from None
        finally:
            with self._lock:
                self._loading.pop(ref.id, None)

    def _local(self, ref: AdapterRef) -> Path:
        """The unpacked artifact on the local disk, fetched from the object store if it is not there."""
        folder = self.cache_dir / ref.id
        if (folder / adapter_format.MANIFEST).exists():
            self.hits += 1
            os.utime(folder)  # most recently used
            return folder
        self.misses += 1
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        unique = uuid.uuid4().hex  # processes may share the folder (replicas on one volume)
        archive = self.cache_dir / f".{ref.id}.{unique}.tar.gz"
        try:
            sha = self.storage.download(ref.storage_key, archive)
        except FileNotFoundError:
            raise AdapterUnavailable(ref.id, "its stored files are missing") from None
        if sha != ref.sha256:
            archive.unlink(missing_ok=True)
            log.error("adapter %s: checksum mismatch (%s != %s)", ref.id, sha, ref.sha256)
            raise AdapterUnavailable(ref.id, "its stored files are damaged (checksum mismatch)")
        staging = self.cache_dir / f".{ref.id}.{unique}"
        try:
            adapter_format.unpack(archive, staging)
            try:
                staging.rename(folder)
            except OSError:  # another process unpacked it first: the same checked files
                shutil.rmtree(staging, ignore_errors=True)
        finally:
            archive.unlink(missing_ok=True)
        self._trim_disk(keep=ref.id)
        return folder

    def forget(self, adapter_id: str) -> None:
        """Drop an adapter from host memory (its files went missing from the disk: the next fetch gets them)."""
        with self._lock:
            self._host.pop(adapter_id, None)

    def _trim_disk(self, keep: str) -> None:
        """Least recently used unpacked adapters off the disk until the rest fit `disk_bytes`."""
        sizes: dict[Path, tuple[float, int]] = {}
        with self._lock:  # prompt-learning adapters in host memory are read from their folder when materialized
            in_use = {keep, *self._host, *self._loading}
        for folder in self.cache_dir.iterdir():
            if not folder.is_dir() or folder.name.startswith(".") or folder.name.endswith(".tmp"):  # being unpacked
                continue
            try:
                size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
                sizes[folder] = (folder.stat().st_mtime, size)
            except FileNotFoundError:
                continue
        folders = sorted(sizes, key=lambda p: sizes[p][0])
        total = sum(size for _, size in sizes.values())
        for folder in folders:
            if total <= self.disk_bytes:
                break
            if folder.name not in in_use:
                shutil.rmtree(folder, ignore_errors=True)
                total -= sizes[folder][1]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
