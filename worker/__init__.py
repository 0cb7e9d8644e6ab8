"""The training worker: Celery tasks, the training recipe, fine-tuning methods, publishing."""
