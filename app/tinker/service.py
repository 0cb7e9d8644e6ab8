"""The Tinker protocol's state in this process: sessions (kept alive by the client's heartbeats, closed after a
bounded silence), training runs (a LoRA on a registered base model; each run's requests executed on a thread of
its own, strictly in the client's `seq_id` order) and futures (each request's result, which the client polls).

Everything here lives in the API process that holds the device (TUNEFORGE_DEVICE), as the serving engine does:
a run is its model in memory. A closed or expired session frees its runs; the futures of a tenant are bounded.
"""

from __future__ import annotations

import heapq
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from app.core.db import session_scope
from app.core.errors import ErrorCode, Gone, InvalidInput, NotFound
from app.core.ids import new_id
from app.core.models import Adapter, TinkerCheckpoint, TinkerRun, utcnow
from app.core.settings import Settings
from app.core.usage import StorageQuotaExceeded, check_storage, lock_tenant
from app.ml import adapter_format
from app.ml.device import resolve_placement
from app.ml.models import ModelRecord, ModelStore
from app.ml.serving import AdapterRef
from app.ml.training.stepwise import Example, LoraRun, SharedBase, StepError
from app.tinker.repository import adapter_ref, delete_saved, expiry, find_saved

log = logging.getLogger(__name__)

FUTURES_KEPT_SECONDS = 600.0  # a result stays retrievable this long after it is ready (a poll lost in transit)
MAX_PENDING_SEQ = 1024  # requests of one run waiting for an earlier seq_id
REFUSED = ""  # a refused request's place in `Run.seen` (no request id: it took its turn as a no-op)
SCORING_MODELS = 2  # models kept for prompt log-probabilities
EMPTY_TOP_K_LOGPROB = -99999.0  # Tinker's empty cell of a top-k table (with token id 0)
MAX_UNNAMED_WEIGHTS = 16  # a session's unnamed sampler weights kept (the latest), for its sampling clients


class LimitReached(InvalidInput):
    """A bound of this server reached (sessions, runs, requests in progress): 422, not 409 or 429, which the tinker
    client retries for minutes before it says anything."""


class UserError(Exception):
    """A request's failure that is the client's to fix (category "user"): its message goes back as it is."""


@dataclass
class Pending:
    """A submitted request: its result once `future` is done (JSON for most, protobuf bytes for some)."""

    tenant_id: str
    kind: str
    future: Future[Any] = field(default_factory=Future)
    done_at: float | None = None


MAX_CURVE_POINTS = 1000  # a run's loss curve keeps its latest steps


@dataclass
class RunMetrics:
    """What the dashboard shows of a run (`tinker_runs.metrics`): its optimizer steps, the tokens its passes
    trained on, and its loss curve — per step, the loss per loss-bearing token of the passes since the step before
    (cross_entropy: the `weights`' sum; the other losses: the targets)."""

    steps: int = 0
    tokens: int = 0
    loss_sum: float = 0.0
    loss_tokens: float = 0.0
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)

    def observe(self, examples: list[Example], loss_fn: str, loss_sum: float) -> None:
        for example in examples:
            self.tokens += len(example.tokens)
            weights = example.inputs.get("weights") if loss_fn == "cross_entropy" else None
            self.loss_tokens += float(weights.abs().sum()) if weights is not None else len(example.tokens)
        self.loss_sum += loss_sum

    def step(self) -> dict[str, Any]:
        self.steps += 1
        if self.loss_tokens > 0:
            self.curve = [*self.curve, (self.steps, round(self.loss_sum / self.loss_tokens, 6))][-MAX_CURVE_POINTS:]
        self.loss_sum = self.loss_tokens = 0.0
        return {"steps": self.steps, "tokens": self.tokens, "loss": self.curve}


@dataclass
class Run:
    model_id: str
    tenant_id: str
    session_id: str
    base_model: str
    rank: int
    revision: str | None = None  # of the base model's files
    metrics: RunMetrics = field(default_factory=RunMetrics)
    metrics_due: dict[str, Any] | None = None  # an optimizer step's metrics, for the run's thread to record
    lora: LoraRun | None = None  # None until the model is loaded
    expected: int = 0  # the seq_id that runs next (0: the run's creation)
    waiting: list[tuple[int, int, Callable[[], None], Pending]] = field(default_factory=list)  # a heap by seq_id
    seen: dict[int, str] = field(default_factory=dict)  # seq_id -> request id (a re-sent request gets the same)
    cond: threading.Condition = field(default_factory=threading.Condition)
    closed: bool = False
    thread: threading.Thread | None = None


@dataclass
class Session:
    id: str
    tenant_id: str
    last_seen: float
    runs: list[str] = field(default_factory=list)
    stored: list[str] = field(default_factory=list)  # object-store keys of the weights saved for samplers
    closed: bool = False


@dataclass(frozen=True)
class Sampler:
    """What a sampling session samples from: a base model, and the LoRA saved from a run (none: the base)."""

    id: str
    tenant_id: str
    base_model: str
    adapter: AdapterRef | None
    model_path: str | None


EXPIRY_ROUND_SECONDS = 5.0
EXPIRED_PER_ROUND = 100  # expired checkpoints deleted in one round of the loop
# This API process, as a run's row names the process whose memory holds it (`tinker_runs.holder`).
HOLDER = f"{socket.gethostname()}:{os.getpid()}"


async def expire_tinker_sessions(service: TinkerService) -> None:
    """The API's loop closing silent sessions (and forgetting old results), and deleting saved weights whose time
    to live has passed, every few seconds."""
    import asyncio

    while True:
        await asyncio.sleep(min(EXPIRY_ROUND_SECONDS, service.settings.tinker_session_timeout_seconds / 2))
        try:
            await asyncio.to_thread(service.expire)
        except Exception:
            log.exception("closing silent Tinker sessions failed")
        try:
            await asyncio.to_thread(service.expire_checkpoints)
        except Exception:
            log.exception("deleting expired Tinker checkpoints failed")


class TinkerService:
    def __init__(
        self, settings: Settings, models: ModelStore, on_stored_gone: Callable[[str], None] | None = None
    ) -> None:
        self.settings = settings
        self.models = models
        self.on_stored_gone = on_stored_gone  # deletes a closed session's saved weights from the object store
        self._lock = threading.Lock()
        self.sessions: dict[str, Session] = {}
        self.runs: dict[str, Run] = {}
        self.futures: dict[str, Pending] = {}
        self.samplers: dict[str, Sampler] = {}
        self._scoring: dict[tuple[str, str, str | None], Any] = {}  # most recently used last
        self._bases: dict[tuple[str, str], SharedBase] = {}  # one copy of each base model's weights for its runs
        self._bases_lock = threading.Lock()  # a base loads once, however many runs start at once
        self._scoring_lock = threading.Lock()
        self.saved: dict[str, tuple[str, str, AdapterRef]] = {}  # tinker:// path -> (tenant, base model, adapter)

    # --- sessions -------------------------------------------------------------------------------------------

    def create_session(self, tenant_id: str) -> str:
        with self._lock:
            mine = sum(1 for s in self.sessions.values() if s.tenant_id == tenant_id and not s.closed)
            if mine >= self.settings.tinker_max_sessions_per_tenant:
                raise LimitReached(
                    f"this tenant has {mine} Tinker sessions open, its limit "
                    "(TUNEFORGE_TINKER_MAX_SESSIONS_PER_TENANT); close one (or let it expire)",
                    code=ErrorCode.too_many_sessions,
                )
            session_id = f"tfs-{secrets.token_hex(8)}"
            self.sessions[session_id] = Session(session_id, tenant_id, time.monotonic())
        log.info("tinker session %s opened", session_id)
        return session_id

    def session(self, tenant_id: str, session_id: str) -> Session:
        with self._lock:
            session = self.sessions.get(session_id)
        if session is None or session.tenant_id != tenant_id:
            raise NotFound(f"no Tinker session {session_id[:80]!r}", param="session_id")
        if session.closed:
            raise Gone(f"the Tinker session {session_id} is closed", param="session_id")
        return session

    def heartbeat(self, tenant_id: str, session_id: str) -> None:
        self.session(tenant_id, session_id).last_seen = time.monotonic()

    def close_session(self, session_id: str, why: str) -> None:
        with self._lock:
            session = self.sessions.get(session_id)
            if session is None or session.closed:
                return
            session.closed = True
            runs = [self.runs.pop(model_id) for model_id in session.runs if model_id in self.runs]
            for sampler_id in [k for k in self.samplers if k.startswith(f"{session_id}:")]:
                del self.samplers[sampler_id]
            for path in [k for k, (_, _, ref) in self.saved.items() if ref.storage_key in session.stored]:
                del self.saved[path]
            stored, session.stored = session.stored, []
        self._delete_stored(stored)
        for run in runs:
            with run.cond:
                run.closed = True
                run.cond.notify_all()
        log.info("tinker session %s closed (%s); %d training run(s) freed", session_id, why, len(runs))

    def expire(self, now: float | None = None) -> list[str]:
        """Close the sessions silent for longer than the timeout, forget old results; the sessions closed."""
        now = time.monotonic() if now is None else now
        limit = self.settings.tinker_session_timeout_seconds
        with self._lock:
            silent = [s.id for s in self.sessions.values() if not s.closed and now - s.last_seen > limit]
            stale = [
                k for k, p in self.futures.items() if p.done_at is not None and now - p.done_at > FUTURES_KEPT_SECONDS
            ]
            for key in stale:
                del self.futures[key]
            gone = [k for k, s in self.sessions.items() if s.closed and now - s.last_seen > FUTURES_KEPT_SECONDS]
            for key in gone:
                del self.sessions[key]
        for session_id in silent:
            self.close_session(session_id, f"no heartbeat for {limit:g} s")
        return silent

    # --- futures ----------------------------------------------------------------------------------------------

    def pending(self, tenant_id: str, kind: str) -> tuple[str, Pending]:
        """A new request (its id, and the future its result goes to), within the tenant's bound."""
        request_id = f"tfr-{secrets.token_hex(12)}"
        pending = Pending(tenant_id, kind)

        def finished(_: Future[Any]) -> None:
            pending.done_at = time.monotonic()

        pending.future.add_done_callback(finished)
        with self._lock:
            mine = sum(1 for p in self.futures.values() if p.tenant_id == tenant_id and p.done_at is None)
            if mine >= self.settings.tinker_max_pending_per_tenant:
                raise LimitReached(
                    f"this tenant has {mine} Tinker requests in progress, its limit "
                    "(TUNEFORGE_TINKER_MAX_PENDING_PER_TENANT); wait for some to finish",
                    code=ErrorCode.too_many_requests_in_progress,
                )
            self.futures[request_id] = pending
        return request_id, pending

    def future(self, tenant_id: str, request_id: str) -> Pending:
        with self._lock:
            pending = self.futures.get(request_id)
        if pending is None or pending.tenant_id != tenant_id:
            raise NotFound(f"no request {request_id[:80]!r} (unknown, or its result expired)", param="request_id")
        return pending

    # --- training runs ----------------------------------------------------------------------------------------

    def create_run(
        self,
        tenant_id: str,
        session_id: str,
        model_seq_id: int,
        record: ModelRecord,
        lora: dict[str, Any],
        start: Callable[[LoraRun], None] | None = None,
    ) -> tuple[str, str]:
        """A new run `<session>:train:<seq>` (the client derives the id itself); its model loads in the
        background, then `start` (loading a saved state) runs on it. The request id of its creation."""
        session = self.session(tenant_id, session_id)
        model_id = f"{session_id}:train:{model_seq_id}"
        with self._lock:
            if model_id in self.runs:
                raise InvalidInput(f"{model_id} exists", param="model_seq_id")
            total = sum(1 for r in self.runs.values() if not r.closed)
            mine = sum(1 for r in self.runs.values() if r.tenant_id == tenant_id and not r.closed)
            if total >= self.settings.tinker_max_runs or mine >= self.settings.tinker_max_runs_per_tenant:
                raise LimitReached(
                    f"this server holds {total} Tinker training runs ({mine} of this tenant's); the limits are "
                    f"{self.settings.tinker_max_runs} (TUNEFORGE_TINKER_MAX_RUNS) and "
                    f"{self.settings.tinker_max_runs_per_tenant} a tenant: close a session first",
                    code=ErrorCode.too_many_runs,
                )
            run = Run(model_id, tenant_id, session_id, record.id, int(lora.get("rank", 32)), record.revision)
            self.runs[model_id] = run
            session.runs.append(model_id)
        request_id, pending = self.pending(tenant_id, "CreateModel")
        with session_scope(self.settings.db_url) as db:
            db.add(
                TinkerRun(
                    id=model_id,
                    tenant_id=tenant_id,
                    base_model=record.id,
                    lora_rank=run.rank,
                    lora_config=lora,
                    holder=HOLDER,
                )
            )

        def load() -> dict[str, Any]:
            try:
                run.lora = LoraRun(
                    self._shared_base(record),
                    f"run_{secrets.token_hex(6)}",
                    rank=run.rank,
                    seed=lora.get("seed"),
                    attention=bool(lora.get("train_attn", True)),
                    mlp=bool(lora.get("train_mlp", True)),
                    unembed=bool(lora.get("train_unembed", True)),
                )
            except StepError:  # refused (no such layers, no room): the run holds nothing and counts no more
                with self._lock:
                    self.runs.pop(model_id, None)
                raise
            if start is not None:
                start(run.lora)
                return {"model_id": model_id, "type": "load_weights"}
            return {"model_id": model_id, "type": "create_model"}

        run.thread = threading.Thread(target=self._serve_run, args=(run,), name=f"tinker-{model_id}", daemon=True)
        self._start(run, 0, pending, load)
        run.thread.start()
        return model_id, request_id

    def _shared_base(self, record: ModelRecord) -> SharedBase:
        key = (record.id, record.revision)
        with self._bases_lock:
            with self._lock:
                shared = self._bases.get(key)
            if shared is None:
                placement = resolve_placement(self.settings.device, self.settings.dtype)
                shared = SharedBase(
                    self.models.load(record, placement),
                    placement,
                    max_batch_tokens=self.settings.train_max_batch_tokens,
                )
                with self._lock:
                    self._bases[key] = shared
            return shared

    def run(self, tenant_id: str, model_id: str) -> Run:
        with self._lock:
            run = self.runs.get(model_id)
        if run is not None and run.tenant_id == tenant_id and not run.closed:
            return run
        with session_scope(self.settings.db_url) as db:
            row = db.get(TinkerRun, model_id)
            holder = row.holder if row is not None and row.tenant_id == tenant_id else None
        if holder is not None and holder != HOLDER:
            raise NotFound(
                f"training run {model_id[:80]!r} is held in the memory of another API process ({holder[:80]}), not "
                f"this one ({HOLDER[:80]}): a session's requests must all reach the process that created it (route "
                "on the session), or, if that process has stopped, the run is gone — its saved states are not: "
                "resume from one with create_training_client_from_state_with_optimizer",
                param="model_id",
            )
        raise NotFound(f"no training run {model_id[:80]!r} (unknown, or its session closed)", param="model_id")

    def submit(self, run: Run, seq_id: int, kind: str, work: Callable[[LoraRun], Any]) -> str:
        """Queue `work` on the run at `seq_id` (run when every earlier seq_id has run); its request id. A seq_id
        sent again (the client's retry) gets the first request's id."""
        with run.cond:
            if run.seen.get(seq_id) == REFUSED:
                raise InvalidInput(f"seq_id {seq_id} of {run.model_id} was refused; send the next", param="seq_id")
            if seq_id in run.seen:
                return run.seen[seq_id]
            if seq_id < run.expected:
                raise InvalidInput(f"seq_id {seq_id} of {run.model_id} has run already", param="seq_id")
            if len(run.waiting) >= MAX_PENDING_SEQ:
                raise LimitReached(
                    f"{run.model_id} has {MAX_PENDING_SEQ} requests waiting for an earlier seq_id: wait for their "
                    "results before sending more",
                    code=ErrorCode.too_many_requests_in_progress,
                )
        request_id, pending = self.pending(run.tenant_id, kind)

        def task() -> Any:
            if run.lora is None:
                raise UserError(f"{run.model_id} could not be created")
            return work(run.lora)

        with run.cond:
            run.seen[seq_id] = request_id
        self._start(run, seq_id, pending, task)
        return request_id

    def skip(self, tenant_id: str, model_id: str, seq_id: int) -> None:
        """A request of a run refused before it was queued (its body invalid, a bound reached) still takes its turn,
        as a no-op: the client numbers a run's requests as it sends them, and the later ones would otherwise wait
        for it forever."""
        with self._lock:
            run = self.runs.get(model_id)
        if run is None or run.tenant_id != tenant_id or run.closed:
            return
        with run.cond:
            if seq_id in run.seen or seq_id < run.expected or len(run.waiting) >= MAX_PENDING_SEQ:
                return
            run.seen[seq_id] = REFUSED
            pending = Pending(tenant_id, "Refused")

            def no_op() -> None:
                pending.future.set_running_or_notify_cancel()

            heapq.heappush(run.waiting, (seq_id, id(pending), no_op, pending))
            run.cond.notify_all()

    def _start(self, run: Run, seq_id: int, pending: Pending, work: Callable[[], Any]) -> None:
        def task() -> None:
            if not pending.future.set_running_or_notify_cancel():
                return
            try:
                pending.future.set_result(work())
            except (StepError, UserError) as exc:
                pending.future.set_exception(UserError(str(exc)))
            except Exception as exc:  # the server's failure: logged here, said without internals to the client
                log.exception("tinker request %s of %s failed", pending.kind, run.model_id)
                pending.future.set_exception(exc)

        with run.cond:
            heapq.heappush(run.waiting, (seq_id, id(task), task, pending))
            run.cond.notify_all()

    def _serve_run(self, run: Run) -> None:
        """The run's thread: each request when its turn comes (seq_id `expected`), until the run is closed; then
        what still waits fails, and the model is let go."""
        while True:
            with run.cond:
                while not run.closed and not (run.waiting and run.waiting[0][0] <= run.expected):
                    run.cond.wait()
                if run.closed:
                    for _, _, _, pending in run.waiting:
                        if pending.future.set_running_or_notify_cancel():
                            pending.future.set_exception(UserError(f"{run.model_id}: its session was closed"))
                    run.waiting.clear()
                    lora, run.lora = run.lora, None  # the adapter's memory goes with the run
                    if lora is not None and lora.close():  # the last run on its base: the base goes too, and the
                        # host memory of its weights and of the steps' activations back to the system
                        from app.ml.training.memory import release_device_memory

                        with self._lock:
                            self._bases = {k: b for k, b in self._bases.items() if b is not lora.shared}
                        release_device_memory()
                    return
                seq_id, _, task, _ = heapq.heappop(run.waiting)
            shared = getattr(run.lora, "shared", None)
            if shared is not None:  # on the base model's one compute thread (see SharedBase.executor)
                shared.executor.submit(task).result()
            else:  # the run's creation: its model loads here
                task()
            try:
                self._record_metrics(run)
            except Exception:  # the database is away: the dashboard misses a point, the run goes on
                log.warning("tinker: the metrics of %s could not be recorded", run.model_id, exc_info=True)
            with run.cond:
                run.expected = max(run.expected, seq_id + 1)

    # --- samplers ---------------------------------------------------------------------------------------------

    def remember_saved(self, tenant_id: str, session_id: str, path: str, base_model: str, ref: AdapterRef) -> None:
        """Unnamed sampler weights (`save_weights_and_get_sampling_client()`: an RL loop's every iteration), kept
        for the session's sampling clients: the session's latest MAX_UNNAMED_WEIGHTS, all deleted when it closes."""
        with self._lock:
            self.saved[path] = (tenant_id, base_model, ref)
            session = self.sessions.get(session_id)
            if session is None:
                return
            session.stored.append(ref.storage_key)
            dropped, session.stored = session.stored[:-MAX_UNNAMED_WEIGHTS], session.stored[-MAX_UNNAMED_WEIGHTS:]
            for old in [k for k, (_, _, saved) in self.saved.items() if saved.storage_key in dropped]:
                del self.saved[old]
        self._delete_stored(dropped)

    def create_sampler(
        self,
        tenant_id: str,
        session_id: str,
        seq_id: int,
        *,
        base_model: str | None,
        model_path: str | None,
        adapter: AdapterRef | None = None,
    ) -> str:
        """A sampling session `<session>:sample:<seq>` on saved weights (`model_path`, or `adapter` just saved) or
        a base model alone."""
        self.session(tenant_id, session_id)
        if model_path is not None and adapter is None:
            with self._lock:
                found = self.saved.get(model_path)
            if found is not None and found[0] == tenant_id:
                base_model, adapter = found[1], found[2]
            else:
                _, base_model, adapter, _ = self.stored_weights(tenant_id, model_path)
        if base_model is None:
            raise InvalidInput("give base_model or model_path", param="base_model")
        sampler_id = f"{session_id}:sample:{seq_id}"
        with self._lock:
            self.samplers[sampler_id] = Sampler(sampler_id, tenant_id, base_model, adapter, model_path)
        return sampler_id

    def sampler(self, tenant_id: str, sampler_id: str) -> Sampler:
        with self._lock:
            sampler = self.samplers.get(sampler_id)
        if sampler is None or sampler.tenant_id != tenant_id:
            raise NotFound(f"no sampling session {sampler_id[:80]!r}", param="sampling_session_id")
        return sampler

    # --- saved weights (rows in the database, files in the object store) -------------------------------------------

    def record_checkpoint(
        self, run: Run, kind: str, name: str, path: str, ref: AdapterRef, size: int, ttl_seconds: int | None = None
    ) -> None:
        """Keep weights `run` saved (already in the object store) under their `tinker://` path, replacing what was
        saved there before. Sampler weights are an adapter too (listed, downloadable, served by its id).
        Refused (UserError, the new files deleted) past the tenant's storage quota, which counts them as it counts
        files and jobs' adapters and checkpoints. With `ttl_seconds`, deleted that long after (`expire_checkpoints`)."""
        tenant_id, run_id = run.tenant_id, run.model_id
        replaced: list[str] = []
        try:
            with session_scope(self.settings.db_url) as db:
                lock_tenant(db, tenant_id)
                old = find_saved(db, tenant_id=tenant_id, path=path)
                if old is not None:  # saved again under the same name: the new files replace the old
                    replaced.append(old[0].storage_key)
                    delete_saved(db, old[0])
                check_storage(
                    db,
                    tenant_id=tenant_id,
                    adding=size,
                    limit=self.settings.max_stored_bytes_per_tenant,
                    what=f"the weights saved at {path[:160]}",
                    lock=False,
                )
                adapter_id = None
                if kind == "sampler":
                    adapter_id = new_id("adapter")
                    db.add(
                        Adapter(
                            id=adapter_id,
                            tenant_id=tenant_id,
                            tinker_path=path,
                            base_model=run.base_model,
                            base_model_revision=run.revision,
                            method="lora",
                            format="peft",
                            storage_key=ref.storage_key,
                            size_bytes=size,
                            sha256=ref.sha256,
                        )
                    )
                    db.flush()
                db.add(
                    TinkerCheckpoint(
                        id=ref.id.removeprefix("tinker-"),
                        tenant_id=tenant_id,
                        run_id=run_id,
                        adapter_id=adapter_id,
                        kind=kind,
                        name=name,
                        tinker_path=path,
                        storage_key=ref.storage_key,
                        sha256=ref.sha256,
                        size_bytes=size,
                        expires_at=expiry(ttl_seconds),
                    )
                )
                db.execute(update(TinkerRun).where(TinkerRun.id == run_id).values(last_request_at=utcnow()))
        except StorageQuotaExceeded as exc:
            self._delete_stored([ref.storage_key])
            raise UserError(str(exc)) from None
        self._delete_stored(replaced)

    def expire_checkpoints(self) -> int:
        """Delete the saved weights whose time to live has passed (their rows, the adapter of sampler weights, and
        their files); how many."""
        with session_scope(self.settings.db_url) as db:
            expired = list(
                db.scalars(
                    select(TinkerCheckpoint)
                    .where(TinkerCheckpoint.expires_at.is_not(None), TinkerCheckpoint.expires_at <= utcnow())
                    .limit(EXPIRED_PER_ROUND)
                )
            )
            for checkpoint in expired:
                delete_saved(db, checkpoint)
            keys = [checkpoint.storage_key for checkpoint in expired]
        self._delete_stored(keys)
        if keys:
            log.info("tinker: %d saved weights deleted at the end of their time to live", len(keys))
        return len(keys)

    def stepped(self, run: Run) -> None:
        """An optimizer step of `run` done (on the compute thread): its metrics (steps, tokens, loss curve), which
        the run's own thread writes for the dashboard once the step is done (`_record_metrics`), off the compute
        thread that every run on the base model shares."""
        run.metrics_due = run.metrics.step()

    def _record_metrics(self, run: Run) -> None:
        metrics, run.metrics_due = run.metrics_due, None
        if metrics is None:
            return
        with session_scope(self.settings.db_url) as db:
            db.execute(
                update(TinkerRun).where(TinkerRun.id == run.model_id).values(metrics=metrics, last_request_at=utcnow())
            )

    def _delete_stored(self, keys: list[str]) -> None:
        if self.on_stored_gone is None:
            return
        for key in keys:
            try:
                self.on_stored_gone(key)
            except Exception:  # the object store is away: the weights stay (no row names them)
                log.warning("tinker: the saved weights %s could not be deleted", key, exc_info=True)

    def stored_weights(
        self, tenant_id: str, path: str, kind: str | None = None
    ) -> tuple[str, str, AdapterRef, dict[str, Any]]:
        """Saved weights by their `tinker://` path: (tenant, base model, their files, the run's LoRA config)."""
        with session_scope(self.settings.db_url) as db:
            found = find_saved(db, tenant_id=tenant_id, path=path)
        if found is None or (kind is not None and found[0].kind != kind):
            what = {"training": "a saved state", "sampler": "saved sampler weights"}.get(kind or "", "saved weights")
            raise NotFound(f"no {what} at {path[:160]!r}", param="path")
        checkpoint, run = found
        return tenant_id, run.base_model, adapter_ref(checkpoint), dict(run.lora_config)

    # --- prompt log-probabilities (`prompt_logprobs`, `compute_logprobs`) -------------------------------------------

    def prompt_logprobs(
        self, storage: Any, sampler: Sampler, record: ModelRecord, tokens: list[int], top_k: int = 0
    ) -> tuple[list[float], Any]:
        """Each prompt token's log-probability given the tokens before it under the sampler's weights (NaN for
        the first: nothing predicts it), and with `top_k` the k likeliest tokens at each prompt position and their
        log-probabilities (token ids and log-probabilities, [len(tokens), k]; the first row Tinker's empty cells).
        A forward pass on a scoring copy of the model (the two most recently used kept), one at a time, with the
        training recipe's log-probabilities (`token_log_probs`: the output layer a chunk of positions at a time)."""
        import math

        import numpy as np
        import torch

        from app.ml.training.dpo import token_log_probs

        with self._scoring_lock:
            model = self._scoring_model(storage, sampler, record)
            device = next(model.parameters()).device
            ids = torch.tensor([tokens], device=device)
            targets = torch.tensor([[*tokens[1:], 0]], device=device)  # position i predicts token i + 1
            positions = torch.ones_like(ids, dtype=torch.bool)
            positions[0, -1] = False  # the last position predicts nothing of the prompt
            with torch.no_grad():
                picked = token_log_probs(model, ids, torch.ones_like(ids), targets, positions)
                top = top_k_log_probs(model, ids, top_k) if top_k else None
        logprobs = [math.nan, *picked.cpu().tolist()]
        if top is None:
            return logprobs, None
        token_ids = np.zeros((len(tokens), top_k), dtype=np.int32)
        values = np.full((len(tokens), top_k), EMPTY_TOP_K_LOGPROB, dtype=np.float32)
        token_ids[1:], values[1:] = top[0].cpu().numpy(), top[1].cpu().numpy()
        return logprobs, (token_ids, values)

    def _scoring_model(self, storage: Any, sampler: Sampler, record: ModelRecord) -> Any:
        key = (record.id, record.revision, sampler.adapter.id if sampler.adapter else None)
        cached = self._scoring.pop(key, None)
        if cached is None:
            placement = resolve_placement(self.settings.device, self.settings.dtype)
            cached = self.models.load(record, placement)
            if sampler.adapter is not None:
                from peft import PeftModel

                with fetched(self.settings, storage, sampler.adapter, "saved weights") as folder:
                    cached = PeftModel.from_pretrained(cached, str(folder)).eval()
        self._scoring[key] = cached
        while len(self._scoring) > SCORING_MODELS:
            self._scoring.pop(next(iter(self._scoring)))
        return cached


def top_k_log_probs(model: Any, input_ids: Any, k: int) -> tuple[Any, Any]:
    """At each position of the one row `input_ids` but the last, the `k` likeliest next tokens and their
    log-probabilities ([positions - 1, k] each): the output layer a chunk of positions at a time, so no more than
    one chunk's logits over the vocabulary exist at once."""
    import torch

    from app.ml.training.loss import LOSS_CHUNK_POSITIONS

    hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state[0, :-1]
    head = model.get_output_embeddings()
    ids, values = [], []
    for start in range(0, hidden.shape[0], LOSS_CHUNK_POSITIONS):
        scores = torch.log_softmax(head(hidden[start : start + LOSS_CHUNK_POSITIONS]).float(), dim=-1)
        top = scores.topk(min(k, scores.shape[-1]), dim=-1)
        ids.append(top.indices)
        values.append(top.values)
    return torch.cat(ids), torch.cat(values)


@contextmanager
def fetched(settings: Settings, storage: Any, ref: AdapterRef, what: str) -> Iterator[Path]:
    """Weights a run saved, fetched from the object store, checked against their digest and unpacked in a
    temporary folder while the context lasts; UserError (saying `what`) if they are missing or damaged."""
    try:
        with adapter_format.fetched(storage, ref.storage_key, ref.sha256, settings.tmp_dir) as folder:
            yield folder
    except adapter_format.StoredArtifactUnavailable as exc:
        raise UserError(f"the files of the {what} are {exc.reason}") from None
