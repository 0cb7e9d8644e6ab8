"""The worker's Celery app (`celery -A worker.celery_app worker`), with the training task registered."""

from app.core.queue import make_celery
from app.core.settings import get_settings

_settings = get_settings()
celery_app = make_celery(_settings.broker, _settings.queue_name)
celery_app.conf.include = ["worker.tasks"]
