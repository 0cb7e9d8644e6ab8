"""What is resident on the serving device: base models (at most MAX_BASE_MODELS, least recently used unloaded
first, never one that runs rows) and, per base model, its adapters in their servable form (least recently used
evicted first within the count and byte bounds, never one that a running row or this step's admission uses)."""

from __future__ import annotations

import inspect
import logging
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from app.ml.device import Placement
from app.ml.models import ModelRecord, ModelStore
from app.ml.serving.adapters import AdapterStore
from app.ml.serving.kinds import ArtifactMismatch, HostAdapter, Servable
from app.ml.serving.layers import BatchAdapters
from app.ml.serving.requests import AdapterUnavailable, Generation

if TYPE_CHECKING:
    from app.ml.serving.engine import EngineLimits
    from app.ml.serving.runner import Lane

log = logging.getLogger(__name__)

# Base models kept loaded at once; a request for another unloads the least recently used idle one.
MAX_BASE_MODELS = 2
# Adapters with a model of their own (weight deltas), per base model, may take at most this many times the base
# model's bytes.
MAX_DELTA_MODELS = 2


@dataclass
class Base:
    """A base model in memory, its adapters on the device and its lanes."""

    record: ModelRecord
    plain: Any
    hooks: BatchAdapters
    weights_sha256: str
    model_bytes: int
    kv_bytes_per_token: int
    eos: set[int]
    tokenizer: Any
    takes_logits_to_keep: bool
    adapters: OrderedDict[str, Servable] = field(default_factory=OrderedDict)  # least recently used first
    lanes: dict[str | None, Lane] = field(default_factory=dict)  # None: the base lane; else an adapter's own

    def running(self) -> int:
        return sum(len(lane.rows) for lane in self.lanes.values())


@dataclass
class Waiting:
    """A request in the waiting line, with its adapter's loading."""

    generation: Generation
    loading: Future[HostAdapter] | None = None
    refetched: int = 0
    looked_up: bool = False  # its adapter was looked up on the device once (a cache hit or miss, counted once)


class Residency:
    """The base models and device adapters of one serving process; the host and disk tiers are `store`'s."""

    def __init__(
        self, *, models: ModelStore, placement: Placement, store: AdapterStore, limits: EngineLimits, wake: Any
    ) -> None:
        self.models = models
        self.placement = placement
        self.store = store
        self.limits = limits
        self.wake = wake  # set when an adapter finished loading: the engine looks again
        self.bases: OrderedDict[tuple[str, str], Base] = OrderedDict()  # least recently used first
        self.adapter_hits = self.adapter_misses = 0  # requests whose adapter was (not) on the device already

    def running(self) -> int:
        return sum(base.running() for base in list(self.bases.values()))

    def base(self, record: ModelRecord, busy: set[int]) -> Base | None:
        """The loaded base model, loading it if need be (in place of an idle one: not running rows, nor in `busy`,
        those chosen at this step); None while every loaded one is busy."""
        key = (record.id, record.revision)
        base = self.bases.get(key)
        if base is None:
            while len(self.bases) >= MAX_BASE_MODELS:  # make room first: device memory holds few base models
                idle = [k for k, b in self.bases.items() if not b.running() and id(b) not in busy]
                if not idle:
                    return None
                self._unload(self.bases.pop(idle[0]))
            base = self.bases[key] = self._load(record)
        self.bases.move_to_end(key)
        return base

    def _unload(self, base: Base) -> None:
        import gc

        import torch

        base.hooks.remove()
        base.adapters.clear()
        base.lanes.clear()
        log.info("unloaded base model %s to make room", base.record.id)
        del base
        gc.collect()  # the model's modules hold reference cycles: free its memory now, not at some later collection
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _load(self, record: ModelRecord) -> Base:
        plain = self.models.load(record, self.placement)
        plain.eval()
        tokenizer = self.models.tokenizer(record)
        config = plain.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        element = next(plain.parameters()).element_size()
        return Base(
            record=record,
            plain=plain,
            hooks=BatchAdapters(plain),
            weights_sha256=self.models.weights_sha256(record),
            model_bytes=sum(p.numel() * p.element_size() for p in plain.parameters()),
            kv_bytes_per_token=2 * config.num_hidden_layers * kv_heads * head_dim * element,
            eos={tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set(),
            tokenizer=tokenizer,
            takes_logits_to_keep="logits_to_keep" in inspect.signature(plain.forward).parameters,
        )

    def adapter(self, base: Base, waiting: Waiting, pinned: set[str]) -> Servable | None | bool:
        """The request's adapter on the device, None for the base model, or False while it loads. Loading one
        may evict others, not those `pinned` (chosen at this step) nor those of running rows."""
        ref = waiting.generation.request.adapter
        if ref is None:
            return None
        servable = base.adapters.get(ref.id)
        if not waiting.looked_up:
            waiting.looked_up = True
            if servable is not None:
                self.adapter_hits += 1
            else:
                self.adapter_misses += 1
        if servable is not None:
            base.adapters.move_to_end(ref.id)
            return servable
        if waiting.loading is None:
            waiting.loading = self.store.fetch(ref, weights_sha256=base.weights_sha256)
            waiting.loading.add_done_callback(lambda _: self.wake.set())
        if not waiting.loading.done():
            return False
        host = waiting.loading.result()  # raises AdapterUnavailable for a missing or damaged adapter
        servable = base.adapters.get(ref.id)  # another request for it may have put it there meanwhile
        if servable is None:
            try:
                servable = host.kind.materialize(host, base.plain, base.hooks.hook_ids(), self.placement)
            except ArtifactMismatch as exc:
                raise AdapterUnavailable(ref.id, f"it cannot be applied to {base.record.id}: {exc}") from None
            except OSError:  # its unpacked files left the disk meanwhile (another process's cache trim): again
                self.store.forget(ref.id)
                waiting.refetched += 1
                if waiting.refetched > 2:
                    raise AdapterUnavailable(ref.id, "its files could not be read") from None
                waiting.loading = None
                return False
            base.hooks.hook(list(servable.layers))
            self.store.keep_on_host(host)
            base.adapters[ref.id] = servable
            self._evict(base, pinned)
        return servable

    def _evict(self, base: Base, pinned: set[str]) -> None:
        """Least recently used adapters out of the device until both bounds hold (those running stay)."""
        pinned = pinned | {row.servable.ref.id for lane in base.lanes.values() for row in lane.rows if row.servable}
        newest = next(reversed(base.adapters))

        def over() -> bool:
            light = [s for s in base.adapters.values() if s.own_model is None]
            own_models = [s for s in base.adapters.values() if s.own_model is not None]
            return (
                len(base.adapters) > self.limits.max_adapters
                or sum(s.n_bytes for s in light) > self.limits.adapter_bytes
                or sum(s.n_bytes for s in own_models) > MAX_DELTA_MODELS * base.model_bytes
            )

        for adapter_id in list(base.adapters):
            if not over():
                break
            if adapter_id in pinned or adapter_id == newest:
                continue
            del base.adapters[adapter_id]
            base.lanes.pop(adapter_id, None)

    def device_bytes(self) -> int:
        return sum(s.n_bytes for base in list(self.bases.values()) for s in list(base.adapters.values()))
