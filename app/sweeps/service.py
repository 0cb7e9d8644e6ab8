"""Sweeps: several configurations (method × hyperparameters) of one training file, each an ordinary job, ranked by
validation loss, with asynchronous successive halving stopping the configurations clearly behind.

- `create_sweep` checks every configuration as `POST /jobs` would (a dry run each: a bad one is a 422 naming
  `configurations[i]…`, and nothing is created), plans the rungs and stores the trials; the controller
  (app/sweeps/controller.py) starts their jobs, `budget.max_parallel` at a time.
- The rule (ASHA, Li et al. 2020, "A System for Massively Parallel Hyperparameter Tuning"): rungs at `min_steps`,
  `min_steps·eta`, `min_steps·eta²`, … up to the longest trial's steps over eta; every trial's job evaluates at
  each rung (besides its own `eval_every`), and `rung_decision` stops a trial whose validation loss is not in the
  best ⌈n/eta⌉ of the n trials that have reached that rung so far. A stopped trial's job ends there and publishes what
  it trained (its adapter stays usable); its objective is its loss at the stop.
- The objective of a trial is its job's last validation loss; the table ranks the trials by it (lower first).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.errors import AppError, Conflict, ErrorCode, InvalidInput, NotFound, clip
from app.core.ids import new_id
from app.core.models import Adapter, EvalRun, Job, JobStatus, Sweep, SweepRung, SweepTrial, utcnow
from app.core.pagination import cursor_row, newest_first
from app.core.schemas import unix_time
from app.core.settings import Settings
from app.core.storage import ObjectStorage
from app.evals import service as evals
from app.evals.schemas import RunCreate
from app.jobs import planning
from app.jobs.planning import JobSpec
from app.jobs.service import cancel_job, submit_job
from app.ml.models import ModelStore
from app.sweeps.schemas import Savings, SweepCreate, SweepObject, TrialResult

ENDED = ("succeeded", "failed", "cancelled", "skipped")


def configurations(body: SweepCreate, *, limit: int) -> list[tuple[str, dict[str, Any]]]:
    """The (method, hyperparameters) pairs the request lists, or its grid's product; bounded before expanding."""
    if (body.configurations is None) == (body.grid is None):
        raise InvalidInput("give either `configurations` (a list) or `grid` (methods × values)", param="configurations")
    if body.configurations is not None:
        listed = [(c.method, dict(c.hyperparameters)) for c in body.configurations]
    else:
        assert body.grid is not None
        names = list(body.grid.hyperparameters)
        for name, values in body.grid.hyperparameters.items():
            if not 1 <= len(values) <= 16:
                raise InvalidInput("each hyperparameter takes 1 to 16 values", param=f"grid.hyperparameters.{name}")
        count = len(body.grid.methods) * math.prod(len(v) for v in body.grid.hyperparameters.values())
        if count > limit:
            raise InvalidInput(
                f"the grid makes {count:,} configurations; a sweep may have at most {limit}", param="grid"
            )
        listed = [
            (method, dict(zip(names, values, strict=True)))
            for method in body.grid.methods
            for values in itertools.product(*body.grid.hyperparameters.values())
        ]
    if len(listed) > limit:
        raise InvalidInput(
            f"a sweep may have at most {limit} configurations (got {len(listed)})", param="configurations"
        )
    return listed


def _prefixed(exc: AppError, prefix: str) -> AppError:
    exc.param = f"{prefix}.{exc.param}" if exc.param else prefix
    exc.message = f"{prefix}: {exc.message}"
    return exc


def rungs(min_steps: int, eta: int, longest: int) -> list[int]:
    """The rung steps: min_steps · eta^k, up to the longest configuration's steps over eta (as ASHA's rungs stop a
    factor eta below the most a configuration trains: a later rung would save too little to be worth a decision)."""
    steps, step = [], min_steps
    while step * eta <= longest:
        steps.append(step)
        step *= eta
    return steps


def create_sweep(
    session: Session,
    *,
    settings: Settings,
    storage: ObjectStorage,
    models: ModelStore,
    tenant_id: str,
    body: SweepCreate,
) -> Sweep:
    listed = configurations(body, limit=settings.sweep_max_configurations)
    planned: list[tuple[str, dict[str, Any], int, int]] = []
    where = "configurations" if body.configurations is not None else "grid"
    for i, (method, hyperparameters) in enumerate(listed):
        spec = JobSpec(
            base_model=body.base_model,
            method=method,
            training_file=body.training_file,
            validation_file=body.validation_file,
            hyperparameters=hyperparameters,
        )
        try:
            plan = planning.planned_outside(
                session,
                storage=storage,
                models=models,
                attempt=lambda spec=spec: planning.plan_job(  # type: ignore[misc]
                    session,
                    tenant_id=tenant_id,
                    request=spec,
                    default_base_model=settings.default_base_model,
                    max_batch_tokens=settings.train_max_batch_tokens,
                    cuda_training=planning.cuda_training(settings),
                ),
            )
        except AppError as exc:
            raise _prefixed(exc, f"{where}[{i}]") from None
        dry = planning.dry_run(session, plan, tenant_id=tenant_id)
        needs_loss = body.objective.type == "validation_loss" or body.early_elimination.rule != "none"
        if needs_loss and body.validation_file is None and not dry["held_out_examples"]:
            raise InvalidInput(
                "a sweep compares its configurations by validation loss (its objective, or the rungs of early "
                "elimination): give `validation_file`, or `validation_split` in the hyperparameters",
                param=f"{where}[{i}].hyperparameters.validation_split",
            )
        planned.append((plan.method, plan.stored_hyperparameters(), dry["total_steps"], dry["trainable_parameters"]))
    if body.objective.type == "eval":
        check_eval_objective(session, settings=settings, storage=storage, tenant_id=tenant_id, body=body)
    rule = body.early_elimination
    longest = max(steps for _, _, steps, _ in planned)
    min_steps = rule.min_steps or max(1, planned[0][2] // rule.eta**2)
    steps_of_rungs = rungs(min_steps, rule.eta, longest) if rule.rule == "successive_halving" else []
    sweep = Sweep(
        id=new_id("sweep"),
        tenant_id=tenant_id,
        name=body.name or "",
        spec={
            "base_model": body.base_model,
            "training_file": body.training_file,
            "validation_file": body.validation_file,
            "objective": body.objective.model_dump(exclude_none=True, by_alias=True),
            "budget": body.budget.model_dump(),
            "early_elimination": {**rule.model_dump(), "min_steps": min_steps},
            "rungs": steps_of_rungs,
        },
    )
    session.add(sweep)
    for i, (method, hyperparameters, steps, trainable) in enumerate(planned):
        session.add(
            SweepTrial(
                sweep_id=sweep.id,
                position=i,
                method=method,
                hyperparameters=hyperparameters,
                planned_steps=steps,
                trainable_parameters=trainable,
            )
        )
    session.flush()
    return sweep


def check_eval_objective(
    session: Session, *, settings: Settings, storage: ObjectStorage, tenant_id: str, body: SweepCreate
) -> None:
    """An eval objective names an eval of the tenant's, one of its criteria, and a data source whose run would be
    accepted (checked now, with the base model answering, as each adapter's run will be)."""
    objective = body.objective
    for field in ("eval_id", "testing_criteria", "data_source"):
        if getattr(objective, field) is None:
            raise InvalidInput(
                f"an eval objective needs `{field}`", param=f"objective.{field}", code=ErrorCode.missing_field
            )
    assert objective.eval_id is not None and objective.data_source is not None
    try:
        row = evals.get_eval(session, tenant_id=tenant_id, eval_id=objective.eval_id)
    except NotFound as exc:
        raise _prefixed(exc, "objective") from None
    names = [criterion["name"] for criterion in row.testing_criteria]
    if objective.testing_criteria not in names:
        raise InvalidInput(
            f"eval {row.id} has no criterion named {clip(objective.testing_criteria)} (it has: {', '.join(names)})",
            param="objective.testing_criteria",
        )
    source = objective.data_source.model_dump(exclude_none=True, by_alias=True)
    run = RunCreate.model_validate({"data_source": {**source, "model": body.base_model or settings.default_base_model}})
    try:
        evals.create_run(
            session, settings=settings, storage=storage, tenant_id=tenant_id, eval_id=row.id, body=run, add=False
        )
    except AppError as exc:
        raise _prefixed(exc, "objective") from None


def start_eval(
    session: Session, *, settings: Settings, storage: ObjectStorage, sweep: Sweep, trial: SweepTrial, adapter_id: str
) -> str:
    """The eval objective's run on the trial's adapter, queued; its id."""
    objective = sweep.spec["objective"]
    run = RunCreate.model_validate(
        {
            "name": f"{sweep.id} configuration {trial.position}",
            "data_source": {**objective["data_source"], "model": adapter_id},
            "metadata": {"sweep_id": sweep.id, "sweep_position": str(trial.position)},
        }
    )
    created = evals.create_run(
        session, settings=settings, storage=storage, tenant_id=sweep.tenant_id, eval_id=objective["eval_id"], body=run
    )
    return created.id


def eval_end(session: Session, *, run_id: str, criterion: str) -> tuple[str, float | None, str | None] | None:
    """How the trial's eval run ended: the trial's status, its objective (the criterion's pass rate) and an
    error; None while it runs."""
    run = session.get(EvalRun, run_id)
    if run is None:
        return "failed", None, "its eval run was deleted"
    if run.status in ("queued", "in_progress"):
        return None
    if run.status != "completed":
        return "failed", None, f"its eval run {run.status}: {run.error_message or ''}".strip(": ")
    return "succeeded", evals.pass_rate(session, run, criterion), None


def get_sweep(session: Session, *, tenant_id: str, sweep_id: str) -> Sweep:
    sweep = session.scalar(select(Sweep).where(Sweep.id == sweep_id, Sweep.tenant_id == tenant_id))
    if sweep is None:
        raise NotFound(f"no sweep with id {clip(sweep_id)}", param="sweep_id")
    return sweep


def list_sweeps(session: Session, *, tenant_id: str, limit: int, after: str | None) -> tuple[list[Sweep], bool]:
    cursor = cursor_row(
        after, lambda sweep_id: session.scalar(select(Sweep).where(Sweep.id == sweep_id, Sweep.tenant_id == tenant_id))
    )
    return newest_first(session, select(Sweep).where(Sweep.tenant_id == tenant_id), Sweep, limit=limit, after=cursor)


def trials(session: Session, sweep_id: str) -> list[SweepTrial]:
    return list(
        session.scalars(select(SweepTrial).where(SweepTrial.sweep_id == sweep_id).order_by(SweepTrial.position))
    )


def cancel_sweep(session: Session, *, storage: ObjectStorage, tenant_id: str, sweep_id: str) -> Sweep:
    """Stop starting trials and cancel the running ones' jobs; trials that ended keep their results."""
    sweep = get_sweep(session, tenant_id=tenant_id, sweep_id=sweep_id)
    if sweep.status != "running":
        raise Conflict(
            f"sweep {sweep.id} has already ended ({sweep.status})", param="sweep_id", code=ErrorCode.conflict
        )
    for trial in trials(session, sweep.id):
        if trial.status in ("pending", "starting"):  # one being started: the controller cancels its job
            trial.status = "cancelled"
        elif trial.status in ("running", "evaluating") and trial.job_id is not None:
            with contextlib.suppress(Conflict):  # it ended meanwhile: recorded below as it ended
                cancel_job(session, storage=storage, tenant_id=tenant_id, job_id=trial.job_id)
            ended = trial_end(session, trial.job_id)
            trial.status, trial.objective, trial.error = ended if ended is not None else ("cancelled", None, None)
            if trial.status == "succeeded" and sweep.spec["objective"]["type"] == "eval":
                trial.status, trial.objective = "cancelled", None  # its eval run will not be read
    sweep.status = "cancelled"
    sweep.finished_at = utcnow()
    session.flush()
    return sweep


# --- the rule: asynchronous successive halving ------------------------------------------------------------
def rung_decision(session: Session, *, sweep_id: str, position: int, step: int, value: float) -> tuple[bool, int, int]:
    """Record trial `position`'s validation loss at rung `step`; whether it stops there, its rank and how many
    trials reached the rung (itself included). A value recorded before (a resumed job) is kept."""
    recorded = session.scalar(
        select(SweepRung.value).where(
            SweepRung.sweep_id == sweep_id, SweepRung.step == step, SweepRung.position == position
        )
    )
    if recorded is None:
        session.add(SweepRung(sweep_id=sweep_id, step=step, position=position, value=value))
        session.flush()
    else:
        value = recorded
    values = list(
        session.scalars(select(SweepRung.value).where(SweepRung.sweep_id == sweep_id, SweepRung.step == step))
    )
    spec = session.scalar(select(Sweep.spec).where(Sweep.id == sweep_id)) or {}
    eta = int(spec.get("early_elimination", {}).get("eta", 2))
    rank = 1 + sum(other < value for other in values)
    keep = math.ceil(len(values) / eta)
    return rank > keep, rank, len(values)


# --- the answer ---------------------------------------------------------------------------------------------
def _result(trial: SweepTrial, job: Job | None, adapter_id: str | None) -> TrialResult:
    metrics = job.metrics if job is not None else {}
    wall = None
    if job is not None and job.started_at is not None and job.finished_at is not None:
        wall = round((job.finished_at - job.started_at).total_seconds(), 2)
    return TrialResult(
        rank=None,
        position=trial.position,
        method=trial.method,
        hyperparameters=trial.hyperparameters,
        job_id=trial.job_id,
        status=trial.status,
        objective=trial.objective,
        stopped_early=trial.stopped_early_at is not None,
        stopped_at_step=trial.stopped_early_at,
        steps=job.step if job is not None else 0,
        planned_steps=trial.planned_steps,
        trainable_parameters=trial.trainable_parameters,
        peak_memory_bytes=metrics.get("peak_memory_bytes"),
        tokens_per_second=metrics.get("tokens_per_second"),
        wall_seconds=wall,
        adapter_id=adapter_id,
        error=trial.error,
    )


def sweep_object(session: Session, sweep: Sweep) -> SweepObject:
    rows = trials(session, sweep.id)
    job_ids = [t.job_id for t in rows if t.job_id]
    jobs = {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(job_ids)))} if job_ids else {}
    adapters = (
        dict(session.execute(select(Adapter.job_id, Adapter.id).where(Adapter.job_id.in_(job_ids))).tuples().all())
        if job_ids
        else {}
    )
    results = [_result(t, jobs.get(t.job_id or ""), adapters.get(t.job_id or "")) for t in rows]
    sign = -1 if sweep.spec["objective"]["type"] == "eval" else 1  # a pass rate: higher first; a loss: lower first
    ranked = sorted(
        results, key=lambda r: (r.objective is None, sign * r.objective if r.objective is not None else 0, r.position)
    )
    for rank, result in enumerate(r for r in ranked if r.objective is not None):
        result.rank = rank + 1
    trained = sum(r.steps for r in results)
    # Without elimination, each trial stopped early would have trained its planned steps.
    full = sum(r.planned_steps if r.stopped_early else r.steps for r in results)
    winner = ranked[0] if ranked and ranked[0].objective is not None and sweep.status == "succeeded" else None
    spec = sweep.spec
    return SweepObject(
        id=sweep.id,
        name=sweep.name,
        status=sweep.status,
        created_at=unix_time(sweep.created_at) or 0,
        finished_at=unix_time(sweep.finished_at),
        objective=spec["objective"],
        early_elimination=spec["early_elimination"],
        budget=spec["budget"],
        rungs=spec["rungs"],
        results=ranked,
        winner=winner,
        savings=Savings(
            steps_trained=trained,
            steps_without_elimination=full,
            saved_fraction=round(1 - trained / full, 4) if full else 0.0,
        ),
        error=sweep.error,
    )


def running_sweep_ids(session: Session) -> list[str]:
    return list(session.scalars(select(Sweep.id).where(Sweep.status == "running").order_by(Sweep.created_at)))


JOB_ENDS = {JobStatus.succeeded: "succeeded", JobStatus.failed: "failed", JobStatus.cancelled: "cancelled"}


def trial_end(session: Session, job_id: str) -> tuple[str, float | None, str | None] | None:
    """How the trial's job ended: the trial's status, its objective (the job's last validation loss, when it
    succeeded) and the job's error; None while it runs."""
    row = session.execute(select(Job.status, Job.metrics, Job.error).where(Job.id == job_id)).one_or_none()
    if row is None:
        return "failed", None, "its job was deleted"
    status, metrics, error = row
    if status not in JOB_ENDS:
        return None
    loss = metrics.get("valid_loss")
    objective = float(loss) if isinstance(loss, int | float) and status == JobStatus.succeeded else None
    return JOB_ENDS[status], objective, error


def cancel_trial_job(session: Session, *, storage: ObjectStorage, tenant_id: str, job_id: str) -> None:
    with contextlib.suppress(Conflict):
        cancel_job(session, storage=storage, tenant_id=tenant_id, job_id=job_id)


def adapter_of(session: Session, job_id: str) -> str | None:
    return session.scalar(select(Adapter.id).where(Adapter.job_id == job_id))


def submit_trial(
    session: Session,
    *,
    settings: Settings,
    storage: ObjectStorage,
    models: ModelStore,
    sweep: dict[str, Any],
    trial: SweepTrial,
    tenant_id: str,
) -> str:
    """The trial's job, created, committed and queued as `POST /jobs` does (its metadata names the sweep and the
    trial: the job's worker finds the rungs by it); its id."""
    spec = sweep["spec"]
    job = submit_job(
        session,
        settings=settings,
        storage=storage,
        models=models,
        tenant_id=tenant_id,
        spec=JobSpec(
            base_model=spec["base_model"],
            method=trial.method,
            training_file=spec["training_file"],
            validation_file=spec["validation_file"],
            suffix=f"sweep-{trial.position}",
            hyperparameters=trial.hyperparameters,
            metadata={"sweep_id": sweep["id"], "sweep_position": str(trial.position)},
        ),
    )
    return job.id
