"""The serving engine: one thread, continuous batching, many adapters in one batch.

Callers `submit` a request and get a `Generation` (a future for the result, deltas for streaming, `cancel`). The
engine thread owns the models and loops:
1. take new requests into the waiting line (scheduler.py; bounded: past `max_waiting`, `submit` raises
   EngineOverloaded, and past `max_per_owner` requests of one owner, OwnerOverloaded);
2. admit waiting requests, fairly across owners (each one's oldest first), whose adapter is ready (residency.py:
   base models and adapters on the device), while the batch has room (rows, KV-cache bytes, an eighth of the rows
   kept for owners with none running); they are prefilled and their KV caches join the running batch (runner.py);
3. one decoding step for every running row at once, each row with its own adapter, sampling and stop rules
   (output.py); finished and cancelled rows leave the batch at once.
So a short request that arrives while a long one decodes starts at the next step, not after it.

Where a batch runs ("lanes"): the base model serves requests without an adapter and every adapter its hooks apply
per row (the serving kinds: app/ml/serving/kinds/); an adapter with a model of its own (a weight delta) runs its
requests in a lane of their own, on a copy of the model that shares every tensor the adapter does not replace.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from app.ml.blobs import BlobStore
from app.ml.device import Placement
from app.ml.models import ModelStore
from app.ml.serving.adapters import AdapterStore
from app.ml.serving.output import fail
from app.ml.serving.requests import Delta, EngineClosed, Generation, GenerationRequest, GenerationResult
from app.ml.serving.residency import Residency
from app.ml.serving.runner import BatchRunner
from app.ml.serving.scheduler import Scheduler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineLimits:
    """The engine's bounds (the service's settings give them: TUNEFORGE_SERVING_*)."""

    max_batch: int  # rows decoding at once
    max_waiting: int  # requests waiting to join the batch; past it, submit raises EngineOverloaded
    kv_cache_bytes: int  # the running batch's KV cache, padded rows included (per base model)
    max_adapters: int  # adapters kept on the device per base model
    adapter_bytes: int  # ... and their bytes (adapters with a model of their own have their own bound)
    host_adapter_bytes: int  # adapters kept in host memory when the device is a GPU
    disk_adapter_bytes: int  # unpacked adapters kept on the local disk
    max_prefill_tokens: int = 4096  # prompt tokens prefilled between two decoding steps (at least one request)
    max_per_owner: int | None = None  # requests one owner (a tenant) may have waiting or running; None: no bound


class GenerationEngine:
    def __init__(
        self,
        *,
        models: ModelStore,
        placement: Placement,
        storage: BlobStore,
        cache_dir: Path,
        limits: EngineLimits,
    ) -> None:
        self.placement = placement
        self.limits = limits
        self.store = AdapterStore(
            storage=storage,
            cache_dir=cache_dir,
            dtype=placement.dtype,
            host_bytes=limits.host_adapter_bytes if placement.device.type != "cpu" else 0,
            disk_bytes=limits.disk_adapter_bytes,
        )
        self._wake = threading.Event()
        self.scheduler = Scheduler(
            max_waiting=limits.max_waiting,
            max_batch=limits.max_batch,
            kv_cache_bytes=limits.kv_cache_bytes,
            max_prefill_tokens=limits.max_prefill_tokens,
            max_per_owner=limits.max_per_owner,
        )
        self.residency = Residency(models=models, placement=placement, store=self.store, limits=limits, wake=self._wake)
        self.runner = BatchRunner(placement)
        self._thread = threading.Thread(target=self._run, name="generation-engine", daemon=True)
        self._thread.start()

    # --- callers ------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, on_delta: Callable[[Delta], None] | None = None) -> Generation:
        generation = Generation(request, on_delta)
        self.scheduler.put(generation)
        self._wake.set()
        return generation

    def submit_all(
        self, requests: list[GenerationRequest], on_delta: Callable[[int, Delta], None] | None = None
    ) -> list[Generation]:
        """Submit requests of one owner together, all or none (a call's `n` choices): `on_delta(i, delta)` streams
        the i-th one's."""
        generations = [
            Generation(request, None if on_delta is None else partial(on_delta, i))
            for i, request in enumerate(requests)
        ]
        self.scheduler.put_all(generations)
        self._wake.set()
        return generations

    def generate(self, request: GenerationRequest) -> GenerationResult:
        return self.submit(request).result()

    def close(self) -> None:
        self.scheduler.close()
        self._wake.set()
        self._thread.join(timeout=30)
        self.store.close()

    @property
    def steps(self) -> int:
        """Decoding steps taken (all lanes)."""
        return self.runner.steps

    def stats(self) -> dict[str, int]:
        """Counters and sizes for monitoring; read from any thread (snapshots, no lock on the engine thread)."""
        return {
            "running": self.residency.running(),
            "waiting": self.scheduler.n_waiting(),
            "steps": self.runner.steps,
            "adapter_device_hits": self.residency.adapter_hits,
            "adapter_device_misses": self.residency.adapter_misses,
            "adapter_device_bytes": self.residency.device_bytes(),
            "adapter_host_hits": self.store.host_hits,
            "adapter_host_misses": self.store.host_misses,
            "adapter_host_bytes": self.store.host_bytes_used(),
            "adapter_disk_hits": self.store.hits,
            "adapter_disk_misses": self.store.misses,
        }

    # --- the engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                if not self.residency.running():
                    self._wake.wait(timeout=None if not self.scheduler.waiting else 0.05)
                self._wake.clear()
                if self.scheduler.take_new():
                    self._fail_all(EngineClosed("the serving engine shut down"))
                    return
                try:
                    self.scheduler.admit(self.residency, self.runner)
                except Exception:  # a bug: fail what is running rather than hang every caller
                    log.exception("the serving engine failed to admit requests")
                    self._fail_running(RuntimeError("the serving engine failed"))
                self._step_every_lane()

    def _step_every_lane(self) -> None:
        for base in list(self.residency.bases.values()):
            for key, lane in list(base.lanes.items()):
                if not lane.rows:
                    if key is not None and key not in base.adapters:
                        del base.lanes[key]  # an evicted adapter's own model goes
                    continue
                try:
                    self.runner.step(base, lane)
                except Exception as exc:  # out of memory, say: only this lane's requests fail
                    log.exception("the serving engine failed a decoding step")
                    for row in lane.rows:
                        fail(row.generation, exc)
                    base.lanes.pop(key, None)

    def _fail_all(self, exc: Exception) -> None:
        self.scheduler.fail_waiting(exc)
        self._fail_running(exc)

    def _fail_running(self, exc: Exception) -> None:
        for base in self.residency.bases.values():
            for lane in base.lanes.values():
                for row in lane.rows:
                    fail(row.generation, exc)
            base.lanes = {}
