"""The sweep controller: every API process runs one (`SweepController`), and any number may run at once.

Every `sweep_poll_seconds` it looks at the running sweeps: records how each started trial's job ended (its
objective: the job's last validation loss), starts pending trials as ordinary jobs while fewer than
`budget.max_parallel` run (a trial is taken for starting by a conditional UPDATE, so two processes never start it
twice; one the budget's steps cannot pay for is skipped), and ends a sweep whose trials have all ended. The
decisions of successive halving are made by the trials' own training runs, at each rung (worker/training.py).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy import update

from app.core.db import session_scope
from app.core.errors import AppError, TooManyRequests
from app.core.models import Sweep, SweepTrial, utcnow
from app.core.settings import Settings
from app.core.storage import ObjectStorage
from app.ml.models import ModelStore
from app.sweeps import service

log = logging.getLogger(__name__)


class SweepController:
    def __init__(self, settings: Settings, storage: ObjectStorage, models: ModelStore) -> None:
        self.settings = settings
        self.storage = storage
        self.models = models
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> SweepController:
        if self.settings.sweep_poll_seconds > 0:
            self._thread = threading.Thread(target=self._loop, name="sweep-controller", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.advance_all()
            except Exception:
                log.exception("sweep controller: a round failed; trying again")
            self._wake.wait(self.settings.sweep_poll_seconds)
            self._wake.clear()

    def advance_all(self) -> None:
        with session_scope(self.settings.db_url) as session:
            sweep_ids = service.running_sweep_ids(session)
        for sweep_id in sweep_ids:
            self.advance(sweep_id)

    def advance(self, sweep_id: str) -> None:
        """One round for one sweep: record ended jobs (and eval runs), start trials, end the sweep when every trial
        has ended."""
        with session_scope(self.settings.db_url) as session:
            sweep = session.get(Sweep, sweep_id)
            if sweep is None:
                return
            for trial in service.trials(session, sweep_id):
                if trial.status == "running" and trial.job_id is not None:
                    self._record(session, sweep, trial)
                elif trial.status == "evaluating" and trial.eval_run_id is not None:
                    ended = service.eval_end(
                        session, run_id=trial.eval_run_id, criterion=sweep.spec["objective"]["testing_criteria"]
                    )
                    if ended is not None:
                        trial.status, trial.objective, trial.error = ended
        with session_scope(self.settings.db_url) as session:
            sweep = session.get(Sweep, sweep_id)
            if sweep is None or sweep.status != "running":
                return
            budget = sweep.spec["budget"]
            rows = service.trials(session, sweep_id)
            tenant_id, spec = sweep.tenant_id, sweep.spec
        running = sum(t.status in ("running", "starting", "evaluating") for t in rows)
        used = self._steps_used(rows)
        for trial in rows:
            if trial.status != "pending" or running >= budget["max_parallel"]:
                continue
            if budget["max_total_steps"] is not None and used + trial.planned_steps > budget["max_total_steps"]:
                self._set(trial.id, "pending", status="skipped", error="past the sweep's max_total_steps")
                continue
            if self._start(tenant_id, spec, sweep_id, trial):
                running += 1
                used += trial.planned_steps
        with session_scope(self.settings.db_url) as session:
            rows = service.trials(session, sweep_id)
            if all(t.status in service.ENDED for t in rows):
                ranked = any(t.objective is not None for t in rows)
                session.execute(
                    update(Sweep)
                    .where(Sweep.id == sweep_id, Sweep.status == "running")
                    .values(
                        status="succeeded" if ranked else "failed",
                        error=None if ranked else "no configuration reached a validation loss",
                        finished_at=utcnow(),
                    )
                )
                log.info("sweep %s: ended", sweep_id)

    @staticmethod
    def _steps_used(rows: list[SweepTrial]) -> int:
        """Steps started trials take from the budget: a running one its planned steps; an ended one what it
        trained (a trial stopped early gives the rest back)."""
        used = 0
        for trial in rows:
            if trial.status in ("running", "starting"):
                used += trial.planned_steps
            elif trial.status in ("evaluating", "succeeded", "failed", "cancelled") and trial.job_id is not None:
                used += trial.stopped_early_at or trial.planned_steps
        return used

    def _record(self, session: Any, sweep: Sweep, trial: SweepTrial) -> None:
        assert trial.job_id is not None
        ended = service.trial_end(session, trial.job_id)
        if ended is None:
            return
        status, objective, error = ended
        if status == "succeeded" and sweep.spec["objective"]["type"] == "eval":
            adapter_id = service.adapter_of(session, trial.job_id)
            if adapter_id is not None:
                trial.eval_run_id = service.start_eval(
                    session,
                    settings=self.settings,
                    storage=self.storage,
                    sweep=sweep,
                    trial=trial,
                    adapter_id=adapter_id,
                )
                trial.status = "evaluating"
                return
        trial.status, trial.objective, trial.error = status, objective, error
        log.info("sweep trial %s/%d: %s (objective %s)", trial.sweep_id, trial.position, trial.status, trial.objective)

    def _set(self, trial_id: int, was: str, **values: Any) -> bool:
        with session_scope(self.settings.db_url) as session:
            result = session.execute(
                update(SweepTrial).where(SweepTrial.id == trial_id, SweepTrial.status == was).values(**values)
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

    def _start(self, tenant_id: str, spec: dict[str, Any], sweep_id: str, trial: SweepTrial) -> bool:
        if not self._set(trial.id, "pending", status="starting"):
            return False  # another process took it
        try:
            with session_scope(self.settings.db_url) as session:
                job_id = service.submit_trial(
                    session,
                    settings=self.settings,
                    storage=self.storage,
                    models=self.models,
                    sweep={"id": sweep_id, "spec": spec},
                    trial=trial,
                    tenant_id=tenant_id,
                )
        except TooManyRequests:  # the tenant's limit of active jobs: try again at the next round
            self._set(trial.id, "starting", status="pending")
            return False
        except AppError as exc:  # the file was deleted since, say
            self._set(trial.id, "starting", status="failed", error=exc.message)
            return False
        if not self._set(trial.id, "starting", status="running", job_id=job_id):
            # The sweep was cancelled while its job was being created: the job goes too.
            with session_scope(self.settings.db_url) as session:
                service.cancel_trial_job(session, storage=self.storage, tenant_id=tenant_id, job_id=job_id)
            return False
        log.info("sweep trial %s/%d: job %s started", sweep_id, trial.position, job_id)
        return True
