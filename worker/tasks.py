"""Celery tasks: thin wrappers that hand a job id to the training runner; and the worker's reaper thread."""

from typing import Any

from celery.exceptions import Reject
from celery.signals import worker_ready, worker_shutdown, worker_shutting_down

from app.core.queue import TRAINING_TASK
from app.core.settings import get_settings
from app.jobs.reaper import Reaper
from worker.celery_app import celery_app
from worker.lifecycle import request_stop, stop_requested
from worker.runner import run_training_job

_reaper: Reaper | None = None


@celery_app.task(name=TRAINING_TASK)
def training_run(job_id: str) -> None:
    if stop_requested():  # received while shutting down (a job just handed back, say): leave it for the next
        raise Reject("the worker is stopping", requeue=True)
    run_training_job(get_settings(), job_id)


@worker_ready.connect
def _start_the_reaper(**_: Any) -> None:
    # Every worker looks for jobs whose worker died; it is safe for many processes to do so at once.
    global _reaper
    _reaper = Reaper(get_settings()).__enter__()


@worker_shutting_down.connect
def _stop_the_running_job(**_: Any) -> None:
    # A warm shutdown would otherwise wait for the job to finish, however long it takes: the job checkpoints at
    # its next step and goes back to the queue.
    request_stop()


@worker_shutdown.connect
def _stop_the_reaper(**_: Any) -> None:
    if _reaper is not None:
        _reaper.__exit__(None, None, None)
