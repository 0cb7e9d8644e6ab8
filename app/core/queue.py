"""The Celery app shared by the API (which only sends) and the worker (which also runs the tasks)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from celery import Celery
from kombu.transport import sqlalchemy as kombu_sqlalchemy

from app.core.settings import Settings

TRAINING_TASK = "training.run"
VISIBILITY_TIMEOUT_SECONDS = 7 * 24 * 3600
SQL_BROKER_PREFIX = "sqla+"
SQL_BROKER_POLLING_SECONDS = 0.1


class PolledSQLTransport(kombu_sqlalchemy.Transport):
    """kombu's SQLAlchemy transport, polled every 0.1 s instead of every second.

    A waiting worker asks the broker's table for a message this often, so a job queued on the embedded default
    starts within 0.1 s instead of up to 1 s. kombu's own transport cannot be told: it hands every transport option
    to `create_engine`, which refuses `polling_interval`; the class attribute is what its `drain_events` reads.
    """

    polling_interval = SQL_BROKER_POLLING_SECONDS


def make_celery(broker: str, queue: str) -> Celery:
    if broker.startswith("sqla+sqlite:///"):
        Path(broker.removeprefix("sqla+sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    transport = None
    if broker.startswith(SQL_BROKER_PREFIX):
        # The URL's `sqla+` prefix would pick kombu's transport; without it, the database URL goes to our subclass.
        broker, transport = broker.removeprefix(SQL_BROKER_PREFIX), f"{__name__}:{PolledSQLTransport.__name__}"
    app = Celery("tuneforge", broker=broker)
    if transport is not None:
        app.conf.broker_transport = transport
    app.conf.update(
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        # One job per device: no prefetching; a job is acknowledged only when it ends, so a worker
        # that dies mid-job leaves the message to be delivered again.
        worker_prefetch_multiplier=1,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A task that raises (a failed job: its row says failed already) is acknowledged, never delivered again.
        task_acks_on_failure_or_timeout=True,
        task_default_queue=queue,
        task_routes={TRAINING_TASK: {"queue": queue}},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    if broker.startswith(("redis://", "rediss://")):
        # An unacknowledged message comes back only after this long: longer than any job, so a job that runs
        # for hours is not delivered again by itself. A dead worker's job is found sooner by its stale
        # heartbeat (app/jobs/reaper.py), and a message that does come back claims nothing.
        app.conf.broker_transport_options = {"visibility_timeout": VISIBILITY_TIMEOUT_SECONDS}
    return app


@lru_cache(maxsize=4)
def _sender(broker: str, queue: str) -> Celery:
    return make_celery(broker, queue)


def cuda_queue(queue: str) -> str:
    """The queue of jobs whose method needs CUDA (qlora): only workers that train on CUDA consume it."""
    return f"{queue}-cuda"


def send_training_task(settings: Settings, job_id: str, *, queue: str) -> None:
    """Send `training.run` by name with only the job id to `queue` (which app/jobs/state.py chooses); call after
    the job row is committed."""
    _sender(settings.broker, settings.queue_name).send_task(TRAINING_TASK, kwargs={"job_id": job_id}, queue=queue)
