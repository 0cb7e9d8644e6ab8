"""The waiting line and admission: which requests join the running batch at this step.

Callers put requests in the line, bounded: an owner (a tenant) with `max_per_owner` requests in the engine
(waiting or running) gets OwnerOverloaded, and past `max_waiting` requests in the line, EngineOverloaded, except an
owner with none in the engine, whose first request always gets in. At each step the waiting requests are admitted
fairly across owners (each owner's oldest first, then each one's second, ...), those whose adapter is ready, while
the batch has room (rows, KV-cache bytes) and the step's prefill budget lasts. An eighth of a batch's rows is kept
for owners with no row running, so one owner's many requests cannot make another's first one wait for a row to
free. The admitted ones are prefilled together where they can be (plain prompts for one lane together, a request
with virtual tokens alone).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque

from app.ml.serving.kinds import Servable
from app.ml.serving.output import fail, finish_cancelled
from app.ml.serving.requests import (
    AdapterUnavailable,
    EngineClosed,
    EngineOverloaded,
    Generation,
    GenerationRequest,
    OwnerOverloaded,
)
from app.ml.serving.residency import Base, Residency, Waiting
from app.ml.serving.runner import BatchRunner, lane_key

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(
        self,
        *,
        max_waiting: int,
        max_batch: int,
        kv_cache_bytes: int,
        max_prefill_tokens: int,
        max_per_owner: int | None = None,
    ) -> None:
        self.max_waiting = max_waiting
        self.max_per_owner = max_per_owner
        self.max_batch = max_batch
        self.reserved_rows = max_batch // 8  # rows only an owner with no row running may take
        self._owned: Counter[str | None] = Counter()  # requests in the engine (waiting or running) per owner
        self.kv_cache_bytes = kv_cache_bytes
        self.max_prefill_tokens = max_prefill_tokens
        self._inbox: deque[Generation] = deque()  # put by callers' threads
        self.waiting: deque[Waiting] = deque()  # the engine thread's
        self._lock = threading.Lock()
        self.closed = False

    # --- callers' threads ---------------------------------------------------------------------
    def put(self, generation: Generation) -> None:
        self.put_all([generation])

    def put_all(self, generations: list[Generation]) -> None:
        """Put requests of one owner in the line, all or none (the choices of one call, say): each counts against
        the owner's bound and the line's."""
        owner = generations[0].request.owner
        with self._lock:
            if self.closed:
                raise EngineClosed("the serving engine is shutting down")
            held = self._owned[owner]
            if owner is not None and self.max_per_owner is not None and held + len(generations) > self.max_per_owner:
                raise OwnerOverloaded(owner, held)
            waiting = len(self._inbox) + len(self.waiting)
            if waiting + len(generations) > self.max_waiting and (held or owner is None):
                raise EngineOverloaded(waiting)
            self._owned[owner] += len(generations)
            self._inbox.extend(generations)
        for generation in generations:
            generation.future.add_done_callback(lambda _: self._release(owner))

    def _release(self, owner: str | None) -> None:
        with self._lock:
            self._owned[owner] -= 1
            if self._owned[owner] <= 0:
                del self._owned[owner]

    def owned(self, owner: str | None) -> int:
        """The owner's requests in the engine, waiting or running."""
        with self._lock:
            return self._owned[owner]

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

    def fair_order(self) -> list[Waiting]:
        """The waiting line in the order admission considers it: each owner's oldest request, then each owner's
        second, and so on (by arrival within a round), so that one owner's many requests do not hold back
        another's first."""
        rank: Counter[str | None] = Counter()
        ranked = []
        for arrival, waiting in enumerate(self.waiting):
            owner = waiting.generation.request.owner
            ranked.append((rank[owner], arrival, waiting))
            rank[owner] += 1
        return [waiting for *_, waiting in sorted(ranked, key=lambda r: (r[0], r[1]))]

    def admit(self, residency: Residency, runner: BatchRunner) -> None:
        """Move waiting requests into the batch, fairly across owners, while they fit; prefill them in groups
        (plain prompts for one lane together, a request with virtual tokens alone) within `max_prefill_tokens`."""
        budget = self.max_prefill_tokens
        chosen: list[tuple[Base, str | None, Generation, Servable | None]] = []
        # In fair order, without starving anyone: a request that does not fit its base model's batch keeps the
        # requests behind it for that base model waiting too, and one that needs a base model not loaded while
        # every loaded one is busy keeps every later request waiting, so that one drains.
        full: set[int] = set()
        draining = False
        for waiting in self.fair_order():
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
            if self._reserved(base, request, joining):
                continue  # the rows left are kept for owners with none running
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

    def _reserved(
        self,
        base: Base,
        request: GenerationRequest,
        joining: list[tuple[str | None, GenerationRequest, Servable | None]],
    ) -> bool:
        """Whether the request's owner, which has rows running (or joining) on this base model, would take one of
        the rows kept for owners that have none."""
        if not self.reserved_rows or base.running() + len(joining) < self.max_batch - self.reserved_rows:
            return False  # the batch has rows to spare: no need to look at owners
        if any(other.owner == request.owner for _, other, _ in joining):
            return True
        return any(row.generation.request.owner == request.owner for lane in base.lanes.values() for row in lane.rows)

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
