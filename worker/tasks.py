"""Celery tasks: thin wrappers that hand a job id to the training runner."""

from app.core.queue import TRAINING_TASK
from app.core.settings import get_settings
from worker.celery_app import celery_app
from worker.runner import run_training_job


@celery_app.task(name=TRAINING_TASK)
def training_run(job_id: str) -> None:
    run_training_job(get_settings(), job_id)
