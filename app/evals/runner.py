"""The eval runner: every API process runs one (`EvalRunner`), and any number may run at once.

A run is claimed by a conditional UPDATE (app/evals/repository.py) that gives this process a lease; the runner
answers and grades its items `eval_items_at_once` at a time, their generations (and the model graders' judges)
going through the process's serving engine beside every other request, and writes each batch of output items in
one transaction that also renews the lease. A run canceled or deleted meanwhile stops at that write. A process that
dies leaves its lease to run out; the next runner to look takes the run over and answers only the items not yet
written, so a run survives a restart. A run taken over `MAX_ATTEMPTS` times (a run that kills its process, say)
fails instead.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import IntegrityError

from app.core.db import session_scope
from app.core.errors import AppError, ErrorCode, TooManyRequests
from app.core.ids import new_id
from app.core.metrics import Metrics
from app.core.models import Eval, EvalOutputItem, EvalRun
from app.core.settings import Settings
from app.evals import repository
from app.evals.service import error_of
from app.inference import service as inference
from app.ml.graders import Grade, GraderUnavailable, JudgeRequest, grader_of, lookup, render_messages, sample_namespace
from app.ml.models import ModelStore
from app.ml.serving import GenerationEngine

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
RUNS_AT_ONCE = 4  # runs one process answers together (their items share the engine's batches)
BUSY_RETRY_SECONDS = 0.5  # the engine's waiting line is full, or the tenant's share of it: try again


@dataclass(frozen=True)
class Generated:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class EvalRunner:
    """Claims runs and executes them on this process's engine, in threads of its own."""

    def __init__(
        self, settings: Settings, models: ModelStore, engine: Callable[[], GenerationEngine], metrics: Metrics
    ) -> None:
        self.settings = settings
        self.models = models
        self.engine = engine
        self.metrics = metrics
        self.name = f"{socket.gethostname()}:{os.getpid()}:{new_id('runner')[-8:]}"
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._running: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> EvalRunner:
        if self.settings.eval_poll_seconds > 0:
            self._pool = ThreadPoolExecutor(RUNS_AT_ONCE, thread_name_prefix="eval-run")
            self._thread = threading.Thread(target=self._loop, name="eval-runner", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def wake(self) -> None:
        """Look for runs now (one was just created)."""
        self._wake.set()

    # --- claiming ------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                while len(self._running) < RUNS_AT_ONCE and self._claim_one():
                    pass
            except Exception:
                log.exception("eval runner: looking for runs failed; trying again")
            self._wake.wait(self.settings.eval_poll_seconds)
            self._wake.clear()

    def _claim_one(self) -> bool:
        with session_scope(self.settings.db_url) as session:
            run_id = repository.claim_run(
                session, runner=self.name, lease_seconds=self.settings.eval_lease_seconds, skip=set(self._running)
            )
        if run_id is None:
            return False
        with self._lock:
            self._running.add(run_id)
        assert self._pool is not None
        self._pool.submit(self._execute, run_id)
        return True

    def _execute(self, run_id: str) -> None:
        try:
            self.execute(run_id)
        except Exception:
            # Handed back, not failed: the next claim resumes it from its last written item (and fails it once it
            # has been interrupted MAX_ATTEMPTS times).
            log.exception("eval run %s: interrupted by an internal error; handed back to be resumed", run_id)
            with session_scope(self.settings.db_url) as session:
                repository.release(session, run_id=run_id, runner=self.name)
        finally:
            with self._lock:
                self._running.discard(run_id)
            self._wake.set()

    # --- one run -------------------------------------------------------------------------------------------
    def execute(self, run_id: str) -> None:
        """Answer and grade the claimed run's items not yet written, then end it (completed, or failed)."""
        with session_scope(self.settings.db_url) as session:
            run = session.get(EvalRun, run_id)
            if run is None or run.runner != self.name:
                return
            criteria = session.get(Eval, run.eval_id).testing_criteria  # type: ignore[union-attr]
            done = repository.done_items(session, run_id=run_id)
            tenant_id, items, source, attempts = run.tenant_id, run.items, run.data_source, run.attempts
        if attempts > MAX_ATTEMPTS:
            message = f"the run was interrupted {MAX_ATTEMPTS} times; see the server's log"
            self._finish(run_id, "failed", ErrorCode.internal_error, message)
            return
        log.info(
            "eval run %s: %d of %d items to answer (attempt %d)", run_id, len(items) - len(done), len(items), attempts
        )
        graders = [(criterion, grader_of(criterion)) for criterion in criteria]
        todo = [i for i in range(len(items)) if i not in done]
        step = self.settings.eval_items_at_once
        with ThreadPoolExecutor(step, thread_name_prefix=f"eval-{run_id[-6:]}") as pool:
            for start in range(0, len(todo), step):
                if self._stop.is_set():
                    with session_scope(self.settings.db_url) as session:
                        repository.release(session, run_id=run_id, runner=self.name)
                    return
                batch = todo[start : start + step]
                rows = list(pool.map(lambda i: self._answer(tenant_id, source, graders, run_id, i, items[i]), batch))
                if not self._write(run_id, rows):
                    log.info("eval run %s: no longer this runner's (canceled, deleted or taken over)", run_id)
                    return
        self._finish(run_id, "completed")

    def _finish(self, run_id: str, status: str, code: str | None = None, message: str | None = None) -> None:
        with session_scope(self.settings.db_url) as session:
            repository.finish(session, run_id=run_id, runner=self.name, status=status, code=code, message=message)
        log.info("eval run %s: %s", run_id, status)

    def _write(self, run_id: str, rows: list[EvalOutputItem]) -> bool:
        try:
            with session_scope(self.settings.db_url) as session:
                if not repository.renew(
                    session, run_id=run_id, runner=self.name, lease_seconds=self.settings.eval_lease_seconds
                ):
                    return False
                session.add_all(rows)
        except IntegrityError:  # another runner wrote these items first: the run is no longer this one's
            return False
        return True

    def _answer(
        self,
        tenant_id: str,
        source: dict[str, Any],
        graders: list[tuple[dict[str, Any], Any]],
        run_id: str,
        index: int,
        data: dict[str, Any],
    ) -> EvalOutputItem:
        item = data["item"]
        sampling = source.get("sampling_params") or {}
        sample: dict[str, Any]
        if source["type"] == "jsonl":
            namespace = dict(data.get("sample") or {})
            namespace.setdefault("output_text", "")
            sample = {
                "input": [],
                "output": [{"role": "assistant", "content": namespace["output_text"]}],
                "error": None,
            }
        else:
            messages = self._messages(source, item)
            try:
                generated = self._generate(tenant_id, source["model"], messages, sampling)
            except AppError as exc:
                sample = {"input": messages, "output": [], "error": error_of(exc), "model": source["model"]}
                return self._row(run_id, index, "error", [], sample)
            namespace = sample_namespace(generated.text)
            sample = {
                "input": messages,
                "output": [{"role": "assistant", "content": generated.text}],
                "finish_reason": generated.finish_reason,
                "model": source["model"],
                "usage": {
                    "prompt_tokens": generated.prompt_tokens,
                    "completion_tokens": generated.completion_tokens,
                    "total_tokens": generated.prompt_tokens + generated.completion_tokens,
                    "cached_tokens": 0,
                },
                "error": None,
                "temperature": sampling.get("temperature", 1.0),
                "max_completion_tokens": sampling.get("max_completion_tokens") or inference.DEFAULT_MAX_TOKENS,
                "top_p": sampling.get("top_p", 1.0),
                "seed": sampling.get("seed", 42),
            }
        results, errored = [], False
        for criterion, grader in graders:
            try:
                grade: Grade = grader.grade(item, namespace, lambda request: self._judge(tenant_id, request))
            except (AppError, GraderUnavailable, ValueError, KeyError) as exc:
                errored = True
                reason = (
                    error_of(exc) if isinstance(exc, AppError) else {"code": "grader_error", "message": str(exc)[:300]}
                )
                results.append(
                    {
                        "name": criterion["name"],
                        "type": criterion["type"],
                        "score": 0.0,
                        "passed": False,
                        "sample": None,
                        "error": reason,
                    }
                )
                continue
            results.append(
                {
                    "name": criterion["name"],
                    "type": criterion["type"],
                    "score": grade.score,
                    "passed": grade.passed,
                    "sample": grade.sample,
                }
            )
        status = "error" if errored else "pass" if all(r["passed"] for r in results) else "fail"
        return self._row(run_id, index, status, results, sample)

    @staticmethod
    def _row(
        run_id: str, index: int, status: str, results: list[dict[str, Any]], sample: dict[str, Any]
    ) -> EvalOutputItem:
        return EvalOutputItem(
            id=new_id("outputitem"),
            run_id=run_id,
            datasource_item_id=index,
            status=status,
            results=results,
            sample=sample,
        )

    @staticmethod
    def _messages(source: dict[str, Any], item: dict[str, Any]) -> list[dict[str, str]]:
        spec = source["input_messages"]
        if spec["type"] == "template":
            return render_messages(spec["template"], item, None)
        referenced = lookup({"item": item}, spec["item_reference"]) or []
        return render_messages(referenced, item, None)

    def _generate(
        self, tenant_id: str, model: str, messages: list[dict[str, str]], sampling: dict[str, Any]
    ) -> Generated:
        response_format = sampling.get("response_format") or {}
        json_format = None
        if response_format.get("type") == "json_schema":
            spec = response_format.get("json_schema") or {}
            json_format = inference.JsonFormat(spec.get("schema"), spec.get("name", "response"), "response_format")
        elif response_format.get("type") == "json_object":
            json_format = inference.JsonFormat(None, "json_object", "response_format")
        return self._complete(
            tenant_id,
            model,
            messages,
            inference.Sampling(
                max_tokens=sampling.get("max_completion_tokens"),
                temperature=float(sampling.get("temperature", 1.0)),
                top_p=float(sampling.get("top_p", 1.0)),
                seed=sampling.get("seed", 42),
                json=json_format,
            ),
        )

    def _judge(self, tenant_id: str, request: JudgeRequest) -> str:
        sampling = inference.Sampling(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            json=inference.JsonFormat(request.schema, "grader", "testing_criteria"),
        )
        return self._complete(tenant_id, request.model, request.messages, sampling).text

    def _complete(
        self, tenant_id: str, model: str, messages: list[dict[str, str]], sampling: inference.Sampling
    ) -> Generated:
        prepared = inference.prepare(
            self.settings,
            self.models,
            tenant_id=tenant_id,
            adapter_id=None,
            base_model=None,
            prompt=None,
            messages=messages,
            sampling=sampling,
            model=model,
        )
        deadline = time.monotonic() + self.settings.eval_lease_seconds / 2
        while True:
            try:
                [generation] = inference.submit(self.engine(), prepared, self.metrics)
                break
            except TooManyRequests:
                if time.monotonic() > deadline or self._stop.is_set():
                    raise
                time.sleep(BUSY_RETRY_SECONDS)
        result = inference.outcome(prepared, generation.future)
        return Generated(result.text, result.finish_reason, result.prompt_tokens, result.completion_tokens)
