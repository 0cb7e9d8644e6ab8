"""Celery tasks: thin wrappers that hand a job id to the training runner."""

from typing import Any

from celery.signals import worker_shutting_down

from app.core.queue import TRAINING_TASK
from app.core.settings import get_settings
from worker.celery_app import celery_app
from worker.lifecycle import request_stop
from worker.runner import run_training_job


@celery_app.task(name=TRAINING_TASK)
def training_run(job_id: str) -> None:
    run_training_job(get_settings(), job_id)


@worker_shutting_down.connect
def _stop_the_running_job(**_: Any) -> None:
    # A warm shutdown would otherwise wait for the job to finish, however long it takes.
    request_stop()
