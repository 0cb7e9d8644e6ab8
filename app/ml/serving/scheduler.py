"""The waiting line and admission: which requests join the running batch at this step.

Callers put requests in the line (bounded: past `max_waiting`, `put` raises EngineOverloaded). At each step the
waiting requests are admitted oldest first, those whose adapter is ready, while the batch has room (rows,
KV-cache bytes) and the step's prefill budget lasts; the admitted ones are prefilled together where they can be
(plain prompts for one lane together, a request with virtual tokens alone).
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from app.ml.serving.kinds import Servable
from app.ml.serving.output import fail, finish_cancelled
from app.ml.serving.requests import AdapterUnavailable, EngineClosed, EngineOverloaded, Generation, GenerationRequest
from app.ml.serving.residency import Base, Residency, Waiting
from app.ml.serving.runner import BatchRunner, lane_key

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, *, max_waiting: int, max_batch: int, kv_cache_bytes: int, max_prefill_tokens: int) -> None:
        self.max_waiting = max_waiting
        self.max_batch = max_batch
        self.kv_cache_bytes = kv_cache_bytes
        self.max_prefill_tokens = max_prefill_tokens
        self._inbox: deque[Generation] = deque()  # put by callers' threads
        self.waiting: deque[Waiting] = deque()  # the engine thread's
        self._lock = threading.Lock()
        self.closed = False

    # --- callers' threads ---------------------------------------------------------------------
    def put(self, generation: Generation) -> None:
        with self._lock:
            if self.closed:
                raise EngineClosed("the serving engine is shutting down")
            waiting = len(self._inbox) + len(self.waiting)
            if waiting >= self.max_waiting:
                raise EngineOverloaded(waiting)
            self._inbox.append(generation)

    def close(self) -> None:
        with self._lock:
            self.closed = True

    def n_waiting(self) -> int:
        return len(self.waiting) + len(self._inbox)

    # --- the engine thread ------------------------------------------------------------------
    def take_new(self) -> bool:
        """Move new requests into the waiting line; whether the line is closed."""
        with self._lock:
            while self._inbox:
                self.waiting.append(Waiting(self._inbox.popleft()))
            return self.closed

    def fail_waiting(self, exc: Exception) -> None:
        for waiting in self.waiting:
            fail(waiting.generation, exc)
        self.waiting.clear()

    def admit(self, residency: Residency, runner: BatchRunner) -> None:
        """Move waiting requests into the batch, oldest first, while they fit; prefill them in groups (plain
        prompts for one lane together, a request with virtual tokens alone) within `max_prefill_tokens`."""
        budget = self.max_prefill_tokens
        chosen: list[tuple[Base, str | None, Generation, Servable | None]] = []
        # Oldest first, without starving anyone: a request that does not fit its base model's batch keeps the
        # requests behind it for that base model waiting too, and one that needs a base model not loaded while
        # every loaded one is busy keeps every later request waiting, so that one drains.
        full: set[int] = set()
        draining = False
        for waiting in list(self.waiting):
            generation = waiting.generation
            request = generation.request
            if generation.cancelled or generation.future.cancelled():
                self.waiting.remove(waiting)
                finish_cancelled(generation)
                continue
            if (chosen and budget < len(request.input_ids)) or draining:
                break
            try:
                base = residency.base(request.model, busy={id(b) for b, *_ in chosen})
                if base is None:
                    draining = True  # every loaded base model is busy: let them drain
                    continue
                if id(base) in full:
                    continue
                servable = residency.adapter(base, waiting, pinned={s.ref.id for _, _, _, s in chosen if s})
                if servable is False:
                    continue  # still loading
            except AdapterUnavailable as exc:
                self.waiting.remove(waiting)
                fail(generation, exc)
                continue
            except Exception as exc:  # the base model could not load: fail this request, keep serving
                log.exception("serving: could not prepare %s", request.model.id)
                self.waiting.remove(waiting)
                fail(generation, exc)
                continue
            assert servable is not True
            key = lane_key(servable)
            joining = [(k, g.request, s) for b, k, g, s in chosen if b is base]
            if not self._room(base, key, request, servable, joining):
                full.add(id(base))
                continue
            self.waiting.remove(waiting)
            if not generation.future.set_running_or_notify_cancel():
                continue
            chosen.append((base, key, generation, servable))
            budget -= len(request.input_ids)
        groups: dict[tuple[int, str | None, int], list[tuple[Generation, Servable | None]]] = {}
        for base, key, generation, servable in chosen:
            alone = servable is not None and servable.virtual_tokens > 0  # its own positions and cache prefix
            groups.setdefault((id(base), key, id(generation) if alone else 0), []).append((generation, servable))
        bases = {id(base): base for base, *_ in chosen}
        for (base_id, key, _), items in groups.items():
            try:
                runner.prefill(bases[base_id], key, items)
            except Exception as exc:
                log.exception("serving: the prefill failed")
                for generation, _ in items:
                    fail(generation, exc)

    def _room(
        self,
        base: Base,
        key: str | None,
        request: GenerationRequest,
        servable: Servable | None,
        joining: list[tuple[str | None, GenerationRequest, Servable | None]],
    ) -> bool:
        """Whether the request can join now, with those already `joining` at this step: a row free, and the KV
        cache of every lane of its base model, each row padded to its lane's longest and grown to its max_tokens,
        within `kv_cache_bytes`."""
        from app.ml.serving.kv_cache import GROW_COLUMNS

        running = base.running() + len(joining)
        if running == 0:
            return True  # alone, it always fits (the service bounds a request by the model's context)
        if running >= self.max_batch:
            return False
        lanes: dict[str | None, list[int]] = {}  # final lengths per lane
        for lane_id, lane in base.lanes.items():
            width = lane.mask.shape[1] if lane.rows else 0
            lanes[lane_id] = [width + r.request.max_tokens - len(r.ids) for r in lane.rows]
        for other_key, other, other_servable in [*joining, (key, request, servable)]:
            virtual = other_servable.virtual_tokens if other_servable is not None else 0
            lanes.setdefault(other_key, []).append(virtual + len(other.input_ids) + other.max_tokens)
        tokens = sum(len(finals) * max(finals, default=0) for finals in lanes.values())
        # Buffers keep room to grow (a quarter, at least GROW_COLUMNS) beyond the columns they hold.
        tokens += tokens // 4 + GROW_COLUMNS * sum(len(finals) for finals in lanes.values())
        return tokens * base.kv_bytes_per_token <= self.kv_cache_bytes
