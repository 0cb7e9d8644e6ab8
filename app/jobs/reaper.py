"""The reaper: running jobs whose worker stopped answering go back to the queue (or fail after max attempts), and
queued jobs that no worker took for long have their task sent again.

A worker marks its job alive every `heartbeat_seconds` from a thread of its own. A `running` job whose heartbeat
is older than `heartbeat_timeout_seconds` is on a worker that died (kill -9, a lost machine): the reaper sends
its task again and marks it `queued`; the worker that takes it resumes from the job's latest checkpoint. After
`max_job_attempts` lost workers it is failed with the reason instead (graceful hand-backs do not count). Ages are
measured with the database's clock, which also wrote the heartbeats: no host's clock takes part.

A `queued` job whose task was lost (a crash between the commit and the send, a message the broker dropped) would
wait forever: one queued for `queued_resend_seconds` has its task sent again (and again after each interval while
it waits behind others; each extra delivery claims nothing).

Safe to run in every API and worker process at once: the task is sent before the job is marked queued (a
reaper that dies in between leaves a task whose claim takes the stale job anyway), every change is
conditioned on the stale state it saw, and a task sent twice is claimed once.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy import or_, select, update

from app.core.db import session_scope
from app.core.errors import ErrorCode
from app.core.idempotency import sweep_expired_keys
from app.core.models import Job, JobStatus, db_now
from app.core.settings import Settings
from app.core.storage import ObjectStorage
from app.jobs import state
from app.jobs.workers import tell_waiting_jobs

log = logging.getLogger(__name__)


def lost_job_message(attempts: int) -> str:
    return (
        f"the worker running this job stopped answering, {attempts} times; the job is not tried again. Create it "
        "again (its checkpoints can be downloaded), or ask the operator to look at the workers"
    )


def reap_stale_jobs(settings: Settings) -> list[str]:
    """Re-queue (or fail, or pause when its user asked to) every running job with a stale heartbeat; returns their
    ids."""
    cutoff = db_now(-settings.heartbeat_timeout_seconds)
    with session_scope(settings.db_url) as session:
        stale = session.execute(
            select(
                Job.id, Job.method, Job.devices, Job.attempt, Job.lost_workers, Job.heartbeat_at, Job.pause_requested_at
            ).where(Job.status == JobStatus.running, Job.heartbeat_at < cutoff)
        ).all()
    storage = ObjectStorage.from_settings(settings)
    reaped = []
    for job_id, method, devices, attempt, lost, heartbeat_at, pause_requested_at in stale:
        values: dict[str, object]
        data: dict[str, object]
        if pause_requested_at is not None:  # its user asked to pause it: paused, at its latest checkpoint
            name, level = "pause_lost", "warning"
            message = (
                "the worker running this job stopped answering while pausing it; the job is paused and resumes "
                "from its latest checkpoint"
            )
            values, data = {"lost_workers": lost + 1, "pause_requested_at": None}, {"attempt": attempt}
        elif lost + 1 >= settings.max_job_attempts:
            name, message, level = "lose_for_good", lost_job_message(lost + 1), "error"
            values = {"error": message, "error_code": ErrorCode.worker_lost}
            data = {"code": ErrorCode.worker_lost}
        else:
            # First the task, then the state: whatever happens in between, a task exists for the job.
            state.enqueue(settings, job_id, method, devices)
            name, level = "requeue_lost", "warning"
            message = (
                f"the worker running this job stopped answering (last heartbeat {heartbeat_at:%Y-%m-%d %H:%M:%S} "
                "UTC); the job is back in the queue and resumes from its latest checkpoint"
            )
            values, data = {"lost_workers": lost + 1}, {"attempt": attempt}
        with session_scope(settings.db_url) as session:
            moved = state.transition(
                session,
                job_id,
                name,
                message=message,
                data=data,
                level=level,
                where=(Job.attempt == attempt, Job.heartbeat_at < cutoff),  # still the stale run it saw
                values=values,
                storage=storage,
            )
        if moved:
            reaped.append(job_id)
            log.warning("job %s: stale heartbeat; %s", job_id, state.TRANSITIONS[name].target.value)
    return reaped


def resend_queued_jobs(settings: Settings) -> list[str]:
    """Send the task of every job queued for longer than `queued_resend_seconds` again; returns their ids."""
    cutoff = db_now(-settings.queued_resend_seconds)
    waiting = or_(Job.queued_at.is_(None), Job.queued_at < cutoff)  # None: queued before the column existed
    with session_scope(settings.db_url) as session:
        due = session.execute(
            select(Job.id, Job.method, Job.devices).where(Job.status == JobStatus.queued, waiting)
        ).all()
    resent = []
    for job_id, method, devices in due:
        with session_scope(settings.db_url) as session:
            # The row stays locked until the task is sent: another reaper finds it fresh and sends nothing; a send
            # that fails rolls the mark back, for the next round.
            marked = session.execute(
                update(Job).where(Job.id == job_id, Job.status == JobStatus.queued, waiting).values(queued_at=db_now())
            ).rowcount  # type: ignore[attr-defined]
            if marked != 1:
                continue
            state.enqueue(settings, job_id, method, devices)
        resent.append(job_id)
        log.warning("job %s: queued for over %.0f s; its task was sent again", job_id, settings.queued_resend_seconds)
    return resent


class Reaper:
    """Runs `reap_stale_jobs`, `resend_queued_jobs` and `tell_waiting_jobs` every `reaper_seconds` in a daemon
    thread, for as long as the context is open (and sweeps expired idempotency keys: app/core/idempotency.py)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reaper", daemon=True)

    def __enter__(self) -> Reaper:
        if self.settings.reaper_seconds > 0:
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._done.wait(self.settings.reaper_seconds):
            for round_ in (reap_stale_jobs, resend_queued_jobs, tell_waiting_jobs):
                try:
                    round_(self.settings)
                except Exception as exc:  # the database or broker is away: the next round tries again
                    log.warning("reaper: %s", type(exc).__name__)
            sweep_expired_keys(self.settings.db_url)
