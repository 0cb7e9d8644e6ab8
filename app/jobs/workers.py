"""The training workers that run, as the database knows them (`workers`): each says what it owns (its devices)
when it starts and every `heartbeat_seconds` after, and goes when it stops. A job that needs more devices than any
live worker owns is told so in its events — at creation, and by the reaper while it waits — instead of waiting
silently."""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.core.db import session_scope
from app.core.models import Job, JobEvent, JobStatus, Worker, db_now
from app.core.settings import Settings
from app.jobs.events import append_event
from app.ml.methods import METHODS

log = logging.getLogger(__name__)

WAITING_FOR_DEVICES = "waiting_for_devices"  # the `code` of the event that says a job waits for a worker


@dataclass(frozen=True)
class WorkerInfo:
    devices: int
    device_type: str  # "cuda" or "cpu"
    trains_on_cuda: bool

    @property
    def id(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"


def announce(settings: Settings, worker: WorkerInfo) -> None:
    """This worker runs (again): its row written, or its `seen_at` moved on."""
    with session_scope(settings.db_url) as session:
        row = session.get(Worker, worker.id)
        if row is None:
            session.add(
                Worker(
                    id=worker.id,
                    devices=worker.devices,
                    device_type=worker.device_type,
                    trains_on_cuda=worker.trains_on_cuda,
                    started_at=db_now(),
                    seen_at=db_now(),
                )
            )
        else:
            row.seen_at = db_now()


def withdraw(settings: Settings, worker: WorkerInfo) -> None:
    with session_scope(settings.db_url) as session:
        session.execute(delete(Worker).where(Worker.id == worker.id))


def most_devices(session: Session, settings: Settings, *, needs_cuda: bool) -> int:
    """The most devices a live worker (seen within `heartbeat_timeout_seconds`) owns; of those that train on CUDA
    if `needs_cuda`. 0: none runs."""
    live = Worker.seen_at >= db_now(-settings.heartbeat_timeout_seconds)
    query = select(func.max(Worker.devices)).where(live)
    if needs_cuda:
        query = query.where(Worker.trains_on_cuda.is_(True))
    return int(session.scalar(query) or 0)


def waiting_message(devices: int, largest: int) -> str:
    owned = f"the largest running worker owns {largest}" if largest else "no training worker is running"
    return (
        f"no running worker can take this job: it needs {devices} devices and {owned}; it waits in the queue until "
        f"a worker with {devices} devices starts (tuneforge worker --devices ...), or cancel it and create it with "
        "fewer"
    )


def tell_if_waiting(session: Session, settings: Settings, job: Job) -> bool:
    """If no live worker owns the job's devices: say so in the job's events (once), and True."""
    if job.devices <= 1:
        return False
    largest = most_devices(session, settings, needs_cuda=METHODS[job.method].needs_cuda)
    if largest >= job.devices:
        return False
    told = session.scalar(
        select(func.count())
        .select_from(JobEvent)
        .where(JobEvent.job_id == job.id, JobEvent.data["code"].as_string() == WAITING_FOR_DEVICES)
    )
    if not told:
        append_event(
            session,
            job.id,
            "log",
            waiting_message(job.devices, largest),
            {"code": WAITING_FOR_DEVICES, "devices": job.devices, "largest_worker_devices": largest},
            level="warning",
        )
    return True


def tell_waiting_jobs(settings: Settings) -> None:
    """The reaper's round: every queued job on several devices that no live worker can take is told so (once)."""
    with session_scope(settings.db_url) as session:
        waiting = session.scalars(select(Job).where(Job.status == JobStatus.queued, Job.devices > 1)).all()
        for job in waiting:
            tell_if_waiting(session, settings, job)


class Presence:
    """While open, this worker's row is kept fresh every `interval` seconds from a daemon thread; removed at the
    end."""

    def __init__(self, settings: Settings, worker: WorkerInfo) -> None:
        self.settings = settings
        self.worker = worker
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-presence", daemon=True)

    def __enter__(self) -> Presence:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join(timeout=10)
        try:
            withdraw(self.settings, self.worker)
        except Exception as exc:  # the database is away: the row goes stale, which means the same
            log.warning("worker row not removed (%s)", type(exc).__name__)

    def _run(self) -> None:
        while True:
            try:
                announce(self.settings, self.worker)
            except Exception as exc:  # the database is away: the next round tries again
                log.warning("worker row not written (%s)", type(exc).__name__)
            if self._done.wait(self.settings.heartbeat_seconds):
                return
