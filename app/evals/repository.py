"""Queries on evals, their runs and output items (each scoped to a tenant), and the runs' claims and leases."""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from app.core.models import Eval, EvalOutputItem, EvalRun, db_now, utcnow
from app.core.pagination import in_creation_order

ACTIVE = ("queued", "in_progress")


def get_eval(session: Session, *, tenant_id: str, eval_id: str) -> Eval | None:
    return session.scalar(select(Eval).where(Eval.id == eval_id, Eval.tenant_id == tenant_id))


def list_evals(
    session: Session, *, tenant_id: str, limit: int, after: Eval | None, ascending: bool
) -> tuple[list[Eval], bool]:
    return in_creation_order(
        session, select(Eval).where(Eval.tenant_id == tenant_id), Eval, limit=limit, after=after, oldest_first=ascending
    )


def get_run(session: Session, *, tenant_id: str, eval_id: str, run_id: str) -> EvalRun | None:
    return session.scalar(
        select(EvalRun).where(EvalRun.id == run_id, EvalRun.eval_id == eval_id, EvalRun.tenant_id == tenant_id)
    )


def list_runs(
    session: Session, *, eval_id: str, status: str | None, limit: int, after: EvalRun | None, ascending: bool
) -> tuple[list[EvalRun], bool]:
    query = select(EvalRun).where(EvalRun.eval_id == eval_id)
    if status is not None:
        query = query.where(EvalRun.status == status)
    return in_creation_order(session, query, EvalRun, limit=limit, after=after, oldest_first=ascending)


def output_items(session: Session, *, run_id: str) -> list[EvalOutputItem]:
    return list(session.scalars(select(EvalOutputItem).where(EvalOutputItem.run_id == run_id)))


def summaries(session: Session, *, run_id: str) -> list[tuple[str, list[dict[str, Any]], dict[str, Any]]]:
    """(status, results, sample) of each output item: what a run's counts are made of."""
    query = select(EvalOutputItem.status, EvalOutputItem.results, EvalOutputItem.sample).where(
        EvalOutputItem.run_id == run_id
    )
    return [(row[0], row[1], row[2]) for row in session.execute(query)]


def get_output_item(session: Session, *, run_id: str, item_id: str) -> EvalOutputItem | None:
    return session.scalar(select(EvalOutputItem).where(EvalOutputItem.id == item_id, EvalOutputItem.run_id == run_id))


def list_output_items(
    session: Session, *, run_id: str, status: str | None, limit: int, after: EvalOutputItem | None, ascending: bool
) -> tuple[list[EvalOutputItem], bool]:
    """In the data's order (`datasource_item_id`), whatever order they were answered in."""
    query = select(EvalOutputItem).where(EvalOutputItem.run_id == run_id)
    if status is not None:
        query = query.where(EvalOutputItem.status == status)
    key = EvalOutputItem.datasource_item_id
    if after is not None:
        query = query.where(key > after.datasource_item_id if ascending else key < after.datasource_item_id)
    rows = list(session.scalars(query.order_by(key.asc() if ascending else key.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def cancel_run(session: Session, *, run_id: str) -> bool:
    """Queued or in progress → canceled (a conditional UPDATE: a run that ended meanwhile keeps its end)."""
    result = session.execute(
        update(EvalRun)
        .where(EvalRun.id == run_id, EvalRun.status.in_(ACTIVE))
        .values(status="canceled", finished_at=utcnow(), lease_until=None)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def delete_run(session: Session, *, run_id: str) -> None:
    session.execute(delete(EvalOutputItem).where(EvalOutputItem.run_id == run_id))
    session.execute(delete(EvalRun).where(EvalRun.id == run_id))


def delete_eval(session: Session, *, eval_id: str) -> None:
    runs = select(EvalRun.id).where(EvalRun.eval_id == eval_id).scalar_subquery()
    session.execute(delete(EvalOutputItem).where(EvalOutputItem.run_id.in_(runs)))
    session.execute(delete(EvalRun).where(EvalRun.eval_id == eval_id))
    session.execute(delete(Eval).where(Eval.id == eval_id))


# --- the runner: claims and leases ------------------------------------------------------------------------
def _claimable() -> Any:
    return or_(
        EvalRun.status == "queued",
        and_(EvalRun.status == "in_progress", or_(EvalRun.lease_until.is_(None), EvalRun.lease_until < db_now())),
    )


def claim_run(session: Session, *, runner: str, lease_seconds: float, skip: set[str]) -> str | None:
    """Take the oldest run that is queued, or in progress with its lease run out (its process died): a conditional
    UPDATE, so two processes never take the same run. Its id, or None. Commit before running it."""
    query = select(EvalRun.id).where(_claimable()).order_by(EvalRun.created_at).limit(8)
    for run_id in session.scalars(query):
        if run_id in skip:
            continue
        result = session.execute(
            update(EvalRun)
            .where(EvalRun.id == run_id, _claimable())
            .values(
                status="in_progress",
                runner=runner,
                lease_until=db_now(lease_seconds),
                attempts=EvalRun.attempts + 1,
            )
        )
        if result.rowcount:  # type: ignore[attr-defined]
            return run_id
    return None


def renew(session: Session, *, run_id: str, runner: str, lease_seconds: float) -> bool:
    """Extend this runner's lease; False if the run is no longer its own (canceled, deleted, taken over)."""
    result = session.execute(
        update(EvalRun)
        .where(EvalRun.id == run_id, EvalRun.runner == runner, EvalRun.status == "in_progress")
        .values(lease_until=db_now(lease_seconds))
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def finish(
    session: Session, *, run_id: str, runner: str, status: str, code: str | None = None, message: str | None = None
) -> bool:
    result = session.execute(
        update(EvalRun)
        .where(EvalRun.id == run_id, EvalRun.runner == runner, EvalRun.status == "in_progress")
        .values(status=status, error_code=code, error_message=message, finished_at=utcnow(), lease_until=None)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def release(session: Session, *, run_id: str, runner: str) -> None:
    """Hand the run back at once (this process is stopping): the next runner to look takes it."""
    session.execute(
        update(EvalRun)
        .where(EvalRun.id == run_id, EvalRun.runner == runner, EvalRun.status == "in_progress")
        .values(lease_until=db_now(-1))
    )


def done_items(session: Session, *, run_id: str) -> set[int]:
    return set(session.scalars(select(EvalOutputItem.datasource_item_id).where(EvalOutputItem.run_id == run_id)))


def count_items(session: Session, *, run_id: str) -> int:
    return int(session.scalar(select(func.count()).where(EvalOutputItem.run_id == run_id)) or 0)
