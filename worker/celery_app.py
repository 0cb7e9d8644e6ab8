"""The worker's Celery app (`celery -A worker.celery_app worker`), with the training task registered."""

from typing import Any

from celery.signals import setup_logging

from app.core.logging import configure_logging
from app.core.queue import make_celery
from app.core.settings import get_settings

_settings = get_settings()
celery_app = make_celery(_settings.broker, _settings.queue_name)
celery_app.conf.include = ["worker.tasks"]


@setup_logging.connect
def _log_as_the_rest_of_tuneforge(**_: Any) -> None:
    # Connected, this replaces Celery's own logging set-up: Celery's loggers write through the same handler and
    # format as the app's (TUNEFORGE_LOG_FORMAT, TUNEFORGE_LOG_LEVEL).
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
