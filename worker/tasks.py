"""Celery tasks: thin wrappers that hand a job id to the training runner; and the worker's reaper and webhook
sender threads."""

from contextvars import Token
from typing import Any

from celery.exceptions import Reject
from celery.signals import task_postrun, task_prerun, worker_ready, worker_shutdown, worker_shutting_down

from app.core.logging import job_id_var
from app.core.queue import TRAINING_TASK
from app.core.settings import Settings, get_settings
from app.jobs.reaper import Reaper
from app.jobs.workers import Presence, WorkerInfo
from app.webhooks.delivery import WebhookSender
from worker.celery_app import celery_app
from worker.lifecycle import request_stop, stop_requested
from worker.runner import run_job

_reaper: Reaper | None = None
_webhook_sender: WebhookSender | None = None
_presence: Presence | None = None


class JobFailed(Exception):
    """The job failed (its row says so, with the error the user sees): the task is reported as failed, not as
    succeeded. Expected (`throws`): Celery logs it at INFO without a traceback (the worker logged the failure at
    ERROR, with the details), and acknowledges the message (`task_acks_on_failure_or_timeout`): never run again."""


CLAIM_RETRY_SECONDS = 10  # a job whose claim met an unreachable database is tried again after this


@celery_app.task(bind=True, name=TRAINING_TASK, throws=(JobFailed,), max_retries=None)
def training_run(self: Any, job_id: str) -> str:
    """Returns how the job's run ended, which Celery logs with the task's end."""
    if stop_requested():  # received while shutting down (a job just handed back, say): leave it for the next
        raise Reject("the worker is stopping", requeue=True)
    outcome = run_job(get_settings(), job_id)
    if outcome.status == "claim_failed":  # still queued: a new message (sent before this one is acknowledged)
        raise self.retry(countdown=CLAIM_RETRY_SECONDS)
    if outcome.status == "failed":
        raise JobFailed(f"job {job_id} failed: {outcome.error_code}")
    return f"job {job_id} {outcome.status}"


_job_context: dict[str, Token[str | None]] = {}  # task id -> job id context to restore after it


@task_prerun.connect
def _log_with_the_job_id(task_id: str, task: Any, kwargs: dict[str, Any] | None = None, **_: Any) -> None:
    # From before the task starts to after Celery logs its end, so that Celery's own lines carry the job id too.
    if task.name == TRAINING_TASK and kwargs and isinstance(kwargs.get("job_id"), str):
        _job_context[task_id] = job_id_var.set(kwargs["job_id"])


@task_postrun.connect
def _log_without_the_job_id(task_id: str, **_: Any) -> None:
    token = _job_context.pop(task_id, None)
    if token is not None:
        job_id_var.reset(token)


@worker_ready.connect
def _start_the_reaper(**_: Any) -> None:
    # Every worker looks for jobs whose worker died; it is safe for many processes to do so at once.
    global _reaper, _webhook_sender, _presence
    # What this worker can take, in the database: a job that needs more devices than any worker owns says so.
    _presence = Presence(get_settings(), this_worker(get_settings())).__enter__()
    _reaper = Reaper(get_settings()).__enter__()
    # And sends the webhooks that are due: its own jobs' ends at once, any other process's at its next poll.
    _webhook_sender = WebhookSender(get_settings()).__enter__()


@worker_shutting_down.connect
def _stop_the_running_job(**_: Any) -> None:
    # A warm shutdown would otherwise wait for the job to finish, however long it takes: the job checkpoints at
    # its next step and goes back to the queue.
    request_stop()


@worker_shutdown.connect
def _stop_the_reaper(**_: Any) -> None:
    if _reaper is not None:
        _reaper.__exit__(None, None, None)
    if _webhook_sender is not None:
        _webhook_sender.__exit__(None, None, None)
    if _presence is not None:
        _presence.__exit__(None, None, None)


def this_worker(settings: Settings) -> WorkerInfo:
    from app.ml.device import WorkerDevices, cuda_training_available, resolve_placement

    placement = resolve_placement(settings.device, settings.dtype)
    return WorkerInfo(
        devices=WorkerDevices.parse(settings.worker_devices).count,
        device_type=placement.device.type,
        trains_on_cuda=cuda_training_available(settings.device),
    )
