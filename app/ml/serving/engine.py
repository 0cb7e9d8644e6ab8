"""The serving engine: one thread, continuous batching, many adapters in one batch.

Callers `submit` a request and get a `Generation` (a future for the result, deltas for streaming, `cancel`). The
engine thread owns the models and loops:
1. take new requests into the waiting line (bounded: past `max_waiting`, `submit` raises `EngineOverloaded`);
2. admit waiting requests, oldest first, whose adapter is ready, while the batch has room (rows, KV-cache bytes):
   each is prefilled alone (its prompt through the model once, with its adapter) and its KV cache joins the
   running batch;
3. one decoding step for every running row at once, each row with its own adapter, sampling and stop rules;
   finished and cancelled rows leave the batch at once.
So a short request that arrives while a long one decodes starts at the next step, not after it.

Where a batch runs ("lanes"): the base model serves requests without an adapter and every PEFT adapter in one
batch (LoRA and IA3 per row through `layers.BatchAdapters`, prompt and p-tuning as per-row virtual-token
embeddings in the prefill, prefix tuning as a per-row prefix in the KV cache). A weight-delta adapter (head,
layerwise, discriminative, full) changes the base weights themselves, so its requests run in a lane of their own,
on a copy of the model that shares every tensor the delta does not replace.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.core.storage import ObjectStorage
from app.ml.device import Placement
from app.ml.registry import ModelRecord, ModelStore
from app.ml.serving.adapters import AdapterStore, HostAdapter, Servable, materialize
from app.ml.serving.layers import BatchAdapters, plan_rows
from app.ml.serving.requests import (
    AdapterUnavailable,
    Delta,
    EngineClosed,
    EngineOverloaded,
    Generation,
    GenerationRequest,
    GenerationResult,
    TokenLogprob,
)
from app.ml.serving.sampling import Sampler

if TYPE_CHECKING:
    import torch

    from app.ml.serving.kv_cache import BatchKVCache

log = logging.getLogger(__name__)

# Base models kept loaded at once; a request for another unloads the least recently used idle one.
MAX_BASE_MODELS = 2
# Weight-delta adapters kept loaded per base model may take at most this many times the base model's bytes.
MAX_DELTA_MODELS = 2


@dataclass(frozen=True)
class EngineLimits:
    max_batch: int = 32  # rows decoding at once
    max_waiting: int = 256  # requests waiting to join the batch; past it, submit raises EngineOverloaded
    kv_cache_bytes: int = 2 << 30  # the running batch's KV cache, padded rows included (per base model)
    max_prefill_tokens: int = 4096  # prompt tokens prefilled between two decoding steps (at least one request)
    max_adapters: int = 64  # adapters kept on the device per base model
    adapter_bytes: int = 1 << 30  # ... and their bytes (weight deltas have their own bound: MAX_DELTA_MODELS)
    host_adapter_bytes: int = 4 << 30  # adapters kept in host memory when the device is a GPU
    disk_adapter_bytes: int = 20 << 30  # unpacked adapters kept on the local disk


@dataclass
class _Row:
    """A request in the running batch."""

    generation: Generation
    servable: Servable | None
    sampler: Sampler
    position: int  # the position of the next token fed to the model
    last: int = 0  # the token to feed next
    ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    sent: int = 0  # characters of text streamed so far
    sent_tokens: int = 0  # tokens (and their log-probabilities) streamed so far
    text: str = ""  # decoded so far (up to `read_offset`)
    prefix_offset: int = 0  # incremental decoding, as vLLM's: ids[prefix_offset:read_offset] were decoded last
    read_offset: int = 0
    finish_reason: str | None = None

    @property
    def request(self) -> GenerationRequest:
        return self.generation.request


@dataclass
class _Lane:
    """A model and the rows decoding through it, with their KV cache and attention mask."""

    model: Any
    hooks: BatchAdapters | None  # the base model's per-row adapter hooks; None for a weight delta's copy
    rows: list[_Row] = field(default_factory=list)
    cache: BatchKVCache | None = None
    mask: Any = None  # [rows, columns] 1 where a row has a token, 0 for left padding
    plan: dict[str, Any] | None = None  # the hooks' plan for these rows (rebuilt when rows change)


@dataclass
class _Base:
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
    lanes: dict[str | None, _Lane] = field(default_factory=dict)  # None: the base lane; else a delta's id

    def running(self) -> int:
        return sum(len(lane.rows) for lane in self.lanes.values())


@dataclass
class _Waiting:
    generation: Generation
    loading: Future[HostAdapter] | None = None
    refetched: int = 0
    looked_up: bool = False  # its adapter was looked up on the device once (a cache hit or miss, counted once)


class GenerationEngine:
    def __init__(
        self,
        *,
        models: ModelStore,
        placement: Placement,
        storage: ObjectStorage,
        cache_dir: Path,
        limits: EngineLimits | None = None,
    ) -> None:
        self.models = models
        self.placement = placement
        self.limits = limits or EngineLimits()
        self.store = AdapterStore(
            storage=storage,
            cache_dir=cache_dir,
            dtype=placement.dtype,
            host_bytes=self.limits.host_adapter_bytes if placement.device.type != "cpu" else 0,
            disk_bytes=self.limits.disk_adapter_bytes,
        )
        self._bases: OrderedDict[tuple[str, str], _Base] = OrderedDict()  # least recently used first
        self._inbox: deque[Generation] = deque()
        self._waiting: deque[_Waiting] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self.steps = 0  # decoding steps taken (all lanes)
        self.adapter_hits = self.adapter_misses = 0  # requests whose adapter was (not) on the device already
        self._thread = threading.Thread(target=self._run, name="generation-engine", daemon=True)
        self._thread.start()

    # --- callers ------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, on_delta: Callable[[Delta], None] | None = None) -> Generation:
        generation = Generation(request, on_delta)
        with self._lock:
            if self._closing:
                raise EngineClosed("the serving engine is shutting down")
            waiting = len(self._inbox) + len(self._waiting)
            if waiting >= self.limits.max_waiting:
                raise EngineOverloaded(waiting)
            self._inbox.append(generation)
        self._wake.set()
        return generation

    def generate(self, request: GenerationRequest) -> GenerationResult:
        return self.submit(request).result()

    def close(self) -> None:
        with self._lock:
            self._closing = True
        self._wake.set()
        self._thread.join(timeout=30)
        self.store.close()

    def stats(self) -> dict[str, int]:
        """Counters and sizes for monitoring; read from any thread (snapshots, no lock on the engine thread)."""
        bases = list(self._bases.values())
        return {
            "running": sum(base.running() for base in bases),
            "waiting": len(self._waiting) + len(self._inbox),
            "steps": self.steps,
            "adapter_device_hits": self.adapter_hits,
            "adapter_device_misses": self.adapter_misses,
            "adapter_device_bytes": sum(s.n_bytes for base in bases for s in list(base.adapters.values())),
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
                busy = any(base.running() for base in self._bases.values())
                if not busy:
                    self._wake.wait(timeout=None if not self._waiting else 0.05)
                self._wake.clear()
                with self._lock:
                    closing = self._closing
                    while self._inbox:
                        self._waiting.append(_Waiting(self._inbox.popleft()))
                if closing:
                    self._fail_all(EngineClosed("the serving engine shut down"))
                    return
                try:
                    self._admit()
                except Exception:  # a bug: fail what is running rather than hang every caller
                    log.exception("the serving engine failed to admit requests")
                    self._fail_running(RuntimeError("the serving engine failed"))
                for base in list(self._bases.values()):
                    for key, lane in list(base.lanes.items()):
                        if not lane.rows:
                            if key is not None and key not in base.adapters:
                                del base.lanes[key]  # an evicted weight delta's copy of the model goes
                            continue
                        try:
                            self._step(base, key, lane)
                        except Exception as exc:  # out of memory, say: only this lane's requests fail
                            log.exception("the serving engine failed a decoding step")
                            for row in lane.rows:
                                _fail(row.generation, exc)
                            base.lanes.pop(key, None)

    def _fail_all(self, exc: Exception) -> None:
        for waiting in self._waiting:
            _fail(waiting.generation, exc)
        self._waiting.clear()
        self._fail_running(exc)

    def _fail_running(self, exc: Exception) -> None:
        for base in self._bases.values():
            for lane in base.lanes.values():
                for row in lane.rows:
                    _fail(row.generation, exc)
            base.lanes = {}

    # --- admission ----------------------------------------------------------------------------
    def _admit(self) -> None:
        """Move waiting requests into the batch, oldest first, while they fit; prefill them in groups (plain
        prompts for one lane together, a prompt-learning adapter's alone) within `max_prefill_tokens`."""
        budget = self.limits.max_prefill_tokens
        chosen: list[tuple[_Base, str | None, Generation, Servable | None]] = []
        # Oldest first, without starving anyone: a request that does not fit its base model's batch keeps the
        # requests behind it for that base model waiting too, and one that needs a base model not loaded while
        # every loaded one is busy keeps every later request waiting, so that one drains.
        full: set[int] = set()
        draining = False
        for waiting in list(self._waiting):
            generation = waiting.generation
            request = generation.request
            if generation.cancelled or generation.future.cancelled():
                self._waiting.remove(waiting)
                _finish_cancelled(generation)
                continue
            if (chosen and budget < len(request.input_ids)) or draining:
                break
            try:
                base = self._base(request.model, busy={id(b) for b, *_ in chosen})
                if base is None:
                    draining = True  # every loaded base model is busy: let them drain
                    continue
                if id(base) in full:
                    continue
                servable = self._adapter(base, waiting, pinned={s.ref.id for _, _, _, s in chosen if s})
                if servable is False:
                    continue  # still loading
            except AdapterUnavailable as exc:
                self._waiting.remove(waiting)
                _fail(generation, exc)
                continue
            except Exception as exc:  # the base model could not load: fail this request, keep serving
                log.exception("serving: could not prepare %s", request.model.id)
                self._waiting.remove(waiting)
                _fail(generation, exc)
                continue
            assert servable is not True
            lane_key = servable.ref.id if servable is not None and servable.delta_model is not None else None
            joining = [(key, g.request, s) for b, key, g, s in chosen if b is base]
            if not self._room(base, lane_key, request, servable, joining):
                full.add(id(base))
                continue
            self._waiting.remove(waiting)
            if not generation.future.set_running_or_notify_cancel():
                continue
            chosen.append((base, lane_key, generation, servable))
            budget -= len(request.input_ids)
        groups: dict[tuple[int, str | None, int], list[tuple[Generation, Servable | None]]] = {}
        for base, lane_key, generation, servable in chosen:
            alone = servable is not None and servable.virtual_tokens > 0  # its own positions and cache prefix
            key = (id(base), lane_key, id(generation) if alone else 0)
            groups.setdefault(key, []).append((generation, servable))
        bases = {id(base): base for base, *_ in chosen}
        for (base_id, lane_key, _), items in groups.items():
            try:
                self._prefill(bases[base_id], lane_key, items)
            except Exception as exc:
                log.exception("serving: the prefill failed")
                for generation, _ in items:
                    _fail(generation, exc)

    def _room(
        self,
        base: _Base,
        lane_key: str | None,
        request: GenerationRequest,
        servable: Servable | None,
        joining: list[tuple[str | None, GenerationRequest, Servable | None]],
    ) -> bool:
        """Whether the request can join now, with those already `joining` at this step: a row free, and the KV
        cache of every lane of its base model, each row padded to its lane's longest and grown to its max_tokens,
        within `kv_cache_bytes`."""
        running = base.running() + len(joining)
        if running == 0:
            return True  # alone, it always fits (the service bounds a request by the model's context)
        if running >= self.limits.max_batch:
            return False
        lanes: dict[str | None, list[int]] = {}  # final lengths per lane
        for key, lane in base.lanes.items():
            width = lane.mask.shape[1] if lane.rows else 0
            lanes[key] = [width + r.request.max_tokens - len(r.ids) for r in lane.rows]
        for key, other, other_servable in [*joining, (lane_key, request, servable)]:
            virtual = other_servable.virtual_tokens if other_servable is not None else 0
            lanes.setdefault(key, []).append(virtual + len(other.input_ids) + other.max_tokens)
        tokens = sum(len(finals) * max(finals, default=0) for finals in lanes.values())
        from app.ml.serving.kv_cache import GROW_COLUMNS

        # Buffers keep room to grow (a quarter, at least GROW_COLUMNS) beyond the columns they hold.
        tokens += tokens // 4 + GROW_COLUMNS * sum(len(finals) for finals in lanes.values())
        return tokens * base.kv_bytes_per_token <= self.limits.kv_cache_bytes

    def _base(self, record: ModelRecord, busy: set[int]) -> _Base | None:
        """The loaded base model, loading it if need be (in place of an idle one: not running rows, nor in `busy`,
        those chosen at this step); None while every loaded one is busy."""
        key = (record.id, record.revision)
        base = self._bases.get(key)
        if base is None:
            while len(self._bases) >= MAX_BASE_MODELS:  # make room first: device memory holds few base models
                idle = [k for k, b in self._bases.items() if not b.running() and id(b) not in busy]
                if not idle:
                    return None
                self._unload(self._bases.pop(idle[0]))
            base = self._bases[key] = self._load_base(record)
        self._bases.move_to_end(key)
        return base

    def _unload(self, base: _Base) -> None:
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

    def _load_base(self, record: ModelRecord) -> _Base:
        plain = self.models.load(record, self.placement)
        plain.eval()
        tokenizer = self.models.tokenizer(record)
        config = plain.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        element = next(plain.parameters()).element_size()
        return _Base(
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

    def _adapter(self, base: _Base, waiting: _Waiting, pinned: set[str]) -> Servable | None | bool:
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
            waiting.loading.add_done_callback(lambda _: self._wake.set())
        if not waiting.loading.done():
            return False
        host = waiting.loading.result()  # raises AdapterUnavailable for a missing or damaged adapter
        servable = base.adapters.get(ref.id)  # another request for it may have put it there meanwhile
        if servable is None:
            from app.ml.methods.delta import DeltaMismatch

            try:
                servable = materialize(host, base.plain, base.hooks.hook_ids(), self.placement)
            except DeltaMismatch as exc:
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

    def _evict(self, base: _Base, pinned: set[str]) -> None:
        """Least recently used adapters out of the device until both bounds hold (those running stay)."""
        pinned = pinned | {row.servable.ref.id for lane in base.lanes.values() for row in lane.rows if row.servable}
        newest = next(reversed(base.adapters))

        def over() -> bool:
            light = [s for s in base.adapters.values() if s.delta_model is None]
            deltas = [s for s in base.adapters.values() if s.delta_model is not None]
            return (
                len(base.adapters) > self.limits.max_adapters
                or sum(s.n_bytes for s in light) > self.limits.adapter_bytes
                or sum(s.n_bytes for s in deltas) > MAX_DELTA_MODELS * base.model_bytes
            )

        for adapter_id in list(base.adapters):
            if not over():
                break
            if adapter_id in pinned or adapter_id == newest:
                continue
            del base.adapters[adapter_id]
            base.lanes.pop(adapter_id, None)

    # --- prefill and decoding ------------------------------------------------------------------
    def _prefill(self, base: _Base, lane_key: str | None, items: list[tuple[Generation, Servable | None]]) -> None:
        """Run the prompts through the model (one with virtual tokens alone; plain prompts together, left-padded),
        take each row's first token, and add the rows that go on, with their KV cache, to the lane's batch."""
        import torch

        from app.ml.serving.kv_cache import BatchKVCache

        device = self.placement.device
        first = items[0][1]
        model: Any = first.delta_model if lane_key is not None and first is not None else base.plain
        kwargs: dict[str, Any] = {"use_cache": True}
        cache = BatchKVCache()
        prompts = [generation.request.input_ids for generation, _ in items]
        if first is not None and first.virtual_tokens:
            assert len(items) == 1
            ids = torch.tensor(prompts, dtype=torch.long, device=device)
            start = 0
            if first.soft_prompt is not None:  # virtual tokens at positions 0.., then the text
                text = model.get_input_embeddings()(ids)
                kwargs["inputs_embeds"] = torch.cat([first.soft_prompt[None].to(text.dtype), text], dim=1)
            else:  # the prefix fills the first positions of the cache; the text comes after it
                assert first.prefix is not None
                kwargs["input_ids"] = ids
                cache = BatchKVCache.holding(first.prefix)
                start = first.virtual_tokens
            lengths = [first.virtual_tokens + len(prompts[0])]
            kwargs["position_ids"] = torch.arange(start, lengths[0], device=device)[None]
            mask = torch.ones((1, lengths[0]), dtype=torch.long, device=device)
        else:
            lengths = [len(prompt) for prompt in prompts]
            width = max(lengths)
            pads = [width - n for n in lengths]
            kwargs["input_ids"] = torch.tensor(
                [[0] * pad + prompt for pad, prompt in zip(pads, prompts, strict=True)], dtype=torch.long, device=device
            )
            kwargs["position_ids"] = torch.tensor(
                [[0] * pad + list(range(n)) for pad, n in zip(pads, lengths, strict=True)], device=device
            )
            mask = torch.tensor([[0] * pad + [1] * n for pad, n in zip(pads, lengths, strict=True)], device=device)
        if base.takes_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        if lane_key is None:
            layers = [servable.layers if servable else None for _, servable in items]
            base.hooks.plan = plan_rows(layers, device=device, dtype=self.placement.dtype)
        try:
            logits = model(**kwargs, attention_mask=mask, cache=cache).logits[:, -1, :]
        finally:
            base.hooks.plan = {}  # outside the engine's passes the base model is itself
        rows = [
            _Row(
                generation=generation,
                servable=servable,
                sampler=Sampler(generation.request, device),
                position=length,
                logprobs=[] if generation.request.logprobs is not None else None,
            )
            for (generation, servable), length in zip(items, lengths, strict=True)
        ]
        for row, token in zip(rows, self._sample(rows, logits, base), strict=True):
            self._emit(base, row, token)
        keep = [i for i, row in enumerate(rows) if row.finish_reason is None]
        if not keep:
            return
        if len(keep) < len(rows):
            mask = _keep_rows(cache, mask, keep)
        lane = base.lanes.get(lane_key)
        if lane is None:
            lane = base.lanes[lane_key] = _Lane(model=model, hooks=base.hooks if lane_key is None else None)
        if lane.cache is None or not lane.rows:
            lane.cache, lane.mask = cache, mask
        else:
            width = max(lane.mask.shape[1], mask.shape[1])
            lane.cache.append_rows(cache)
            lane.mask = torch.cat([_left_pad(lane.mask, width), _left_pad(mask, width)])
        lane.rows.extend(rows[i] for i in keep)
        lane.plan = None

    def _step(self, base: _Base, lane_key: str | None, lane: _Lane) -> None:
        import torch

        self._leave(lane, [row for row in lane.rows if row.generation.cancelled])
        if not lane.rows:
            return
        device = self.placement.device
        if lane.hooks is not None:
            if lane.plan is None:
                rows = [row.servable.layers if row.servable else None for row in lane.rows]
                lane.plan = plan_rows(rows, device=device, dtype=self.placement.dtype)
            lane.hooks.plan = lane.plan
        ids = torch.tensor([[row.last] for row in lane.rows], dtype=torch.long, device=device)
        positions = torch.tensor([[row.position] for row in lane.rows], dtype=torch.long, device=device)
        lane.mask = torch.cat([lane.mask, torch.ones((len(lane.rows), 1), dtype=lane.mask.dtype, device=device)], 1)
        try:
            logits = lane.model(
                input_ids=ids, position_ids=positions, attention_mask=lane.mask, cache=lane.cache, use_cache=True
            ).logits[:, -1, :]
        finally:
            base.hooks.plan = {}
        self.steps += 1
        tokens = self._sample(lane.rows, logits, base)
        for row, token in zip(lane.rows, tokens, strict=True):
            row.position += 1
            self._emit(base, row, token)
        self._leave(lane, [row for row in lane.rows if row.finish_reason is not None])

    def _leave(self, lane: _Lane, rows: list[_Row]) -> None:
        """Take finished or cancelled rows out of the batch (and the columns no remaining row uses)."""
        if not rows:
            return
        for row in rows:
            if row.finish_reason is None:
                self._finish(row, "cancelled")
        keep = [i for i, row in enumerate(lane.rows) if row not in rows]
        lane.rows = [lane.rows[i] for i in keep]
        lane.plan = None
        if not keep:
            lane.cache, lane.mask = None, None
            return
        assert lane.cache is not None
        lane.mask = _keep_rows(lane.cache, lane.mask, keep)

    def _sample(self, rows: list[_Row], logits: torch.Tensor, base: _Base) -> list[int]:
        import torch

        logits = logits.float()
        greedy = logits.argmax(dim=-1).tolist()
        logprobs = None
        if any(row.logprobs is not None for row in rows):
            logprobs = torch.log_softmax(logits, dim=-1)
        tokens = []
        for i, row in enumerate(rows):
            token = greedy[i] if row.request.greedy else row.sampler.sample(logits[i])
            if row.logprobs is not None and logprobs is not None:
                row.logprobs.append(_logprob(base.tokenizer, logprobs[i], token, row.request.logprobs or 0))
            tokens.append(token)
        return tokens

    def _emit(self, base: _Base, row: _Row, token: int) -> None:
        """Record a generated token; stream new text; finish the row at an end of sequence, a stop string or
        max_tokens."""
        request = row.request
        row.ids.append(token)
        row.last = token
        finish = None
        if token in base.eos and not request.ignore_eos:
            finish = "stop"
        elif len(row.ids) >= request.max_tokens:
            finish = "length"
        streaming = row.generation.on_delta is not None
        if streaming or request.stop or finish:
            searched = len(row.text)
            self._decode(base, row, final=finish is not None)
            for stop in request.stop:
                cut = row.text.find(stop, max(0, searched - len(stop) + 1))
                if cut != -1:
                    row.text = row.text[:cut]
                    finish = "stop"
        if finish is not None:
            self._finish(row, finish)
        elif streaming:
            ready = len(row.text) - _held_back(row.text, request.stop)
            if ready > row.sent:
                self._send(row, self._delta(row, row.text[row.sent : ready]))
                row.sent = ready

    @staticmethod
    def _decode(base: _Base, row: _Row, final: bool) -> None:
        """Decode the tokens generated since the last call onto `row.text`, a few tokens at a time whatever the
        length (the previous piece is decoded again, so that a piece starting inside a word, or a character
        split over tokens, comes out as in decoding the whole); `final` flushes an unfinished character too."""

        def decode(ids: list[int]) -> str:
            return str(base.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))

        before = decode(row.ids[row.prefix_offset : row.read_offset])
        after = decode(row.ids[row.prefix_offset :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            row.text += after[len(before) :]
            row.prefix_offset, row.read_offset = row.read_offset, len(row.ids)

    @staticmethod
    def _delta(row: _Row, text: str, finish_reason: str | None = None) -> Delta:
        """The next delta: `text`, with the tokens (and log-probabilities) generated since the last one."""
        start, row.sent_tokens = row.sent_tokens, len(row.ids)
        logprobs = row.logprobs[start:] if row.logprobs is not None else None
        return Delta(text=text, token_ids=row.ids[start:], logprobs=logprobs, finish_reason=finish_reason)

    def _send(self, row: _Row, delta: Delta) -> None:
        if row.generation.on_delta is None:
            return
        try:
            row.generation.on_delta(delta)
        except Exception:  # a listener's failure (its client went away) cancels only its request
            log.debug("a delta listener failed; cancelling its request", exc_info=True)
            row.generation.cancel()

    def _finish(self, row: _Row, reason: str) -> None:
        row.finish_reason = reason
        if reason == "cancelled":
            row.text = row.text[: row.sent]

        self._send(row, self._delta(row, row.text[row.sent :], reason))
        row.sent = len(row.text)
        result = GenerationResult(
            text=row.text,
            token_ids=list(row.ids),
            prompt_tokens=len(row.request.input_ids),
            completion_tokens=len(row.ids),
            finish_reason=reason,
            logprobs=row.logprobs,
        )
        if not row.generation.future.done():
            row.generation.future.set_result(result)


def _fail(generation: Generation, exc: BaseException) -> None:
    future = generation.future
    if not future.done() and (future.running() or future.set_running_or_notify_cancel()):
        future.set_exception(exc)


def _finish_cancelled(generation: Generation) -> None:
    if not generation.future.done() and generation.future.set_running_or_notify_cancel():
        request = generation.request
        generation.future.set_result(
            GenerationResult(
                text="",
                token_ids=[],
                prompt_tokens=len(request.input_ids),
                completion_tokens=0,
                finish_reason="cancelled",
            )
        )


def _keep_rows(cache: BatchKVCache, mask: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Keep these rows of a batch's cache, without the columns left of the first that any of them uses; returns
    their mask."""
    import torch

    index = torch.tensor(keep, dtype=torch.long, device=mask.device)
    mask = mask[index]
    used = mask.any(dim=0).nonzero()
    drop = int(used[0]) if len(used) else 0
    cache.keep_rows(index, drop_columns=drop)
    return mask[:, drop:]


def _left_pad(mask: torch.Tensor, width: int) -> torch.Tensor:
    import torch.nn.functional as F

    return F.pad(mask, (width - mask.shape[1], 0)) if mask.shape[1] < width else mask


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that could be the start of a stop string: not streamed until known."""
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    return held


def _logprob(tokenizer: Any, logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    import torch

    alternatives: list[tuple[str, int, float]] = []
    if top:
        values, indices = torch.topk(logprobs, top)
        alternatives = [(tokenizer.decode([i]), i, v) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
    return TokenLogprob(
        token=tokenizer.decode([token]), token_id=token, logprob=float(logprobs[token]), top=alternatives
    )
