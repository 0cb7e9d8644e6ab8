"""One rank of a job on several devices, as `torchrun` starts it (worker/launch.py):
`python -m worker.ranks <job.json>`.

Rank 0 runs the job through the job machinery (worker/runner.py `run_to_an_outcome`) and writes how it ended to
the file the worker reads; it exits 0 only when the job succeeded, so that torchrun stops the other ranks
whenever the run ends early (cancelled, failed). The other ranks build the same recipe from what rank 0 shares
(the base model's record, the state it resumes from) and compute; they read the job's files from the object store
and write nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

from app.core.logging import configure_logging, job_logging_context
from app.core.settings import get_settings
from app.core.storage import ObjectStorage
from app.jobs.state import ClaimedJob
from app.ml.device import resolve_placement
from app.ml.models import ModelRecord
from app.ml.training import StopRequested, TrainingRecipe
from app.ml.training.parallel import OneProcess, from_environment, shards
from worker.launch import die_with_parent
from worker.lifecycle import JobAttempt, JobReporter, request_stop
from worker.runner import run_to_an_outcome
from worker.training import job_recipe, rank_device

log = logging.getLogger(__name__)

EARLY_END_EXIT_CODE = 3  # rank 0, when the run ended before the job succeeded: torchrun stops the other ranks


class Silent:
    """The reporter of ranks other than 0: rank 0 reports for the job."""

    def event(self, type_: str, message: str, data: dict[str, Any] | None = None, level: str = "info") -> None:
        pass

    def placement(self, placement: Any) -> None:
        pass

    def progress(self, **_: Any) -> None:
        pass

    def check_cancelled(self) -> None:
        pass


class TakingPart:
    """The checkpointer of ranks other than 0: takes part in gathering the state and weights rank 0 saves."""

    def save(self, recipe: TrainingRecipe) -> None:
        recipe.state_dict()
        recipe.export(None)


def watch_stop_file(path: Path) -> None:
    """The worker's stop (a file it creates) as this process's stop request; checked every half second."""

    def watch() -> None:
        while not path.exists():
            if stopped.wait(0.5):
                return
        request_stop()

    stopped = threading.Event()
    threading.Thread(target=watch, name="stop-file", daemon=True).start()


def lead(job: ClaimedJob, parallel: OneProcess, spec: dict[str, Any]) -> int:
    settings = get_settings()
    storage = ObjectStorage.from_settings(settings)
    watch_stop_file(Path(spec["stop_file"]))
    attempt = JobAttempt(settings, storage, job)
    reporter = JobReporter(settings.db_url, job, retry_seconds=settings.db_retry_seconds)
    outcome = run_to_an_outcome(settings, storage, attempt, reporter, parallel)
    outcome.log(job.id)
    if outcome.status == "rank_lost":  # no outcome: the worker decides, as when a rank dies outright
        return 1
    fields = dataclasses.asdict(outcome)
    fields.pop("exception")
    fields.pop("logged")
    Path(spec["outcome"]).write_text(json.dumps(fields))
    return 0 if outcome.status == "succeeded" else EARLY_END_EXIT_CODE


def follow(job: ClaimedJob, parallel: OneProcess) -> int:
    settings = get_settings()
    storage = ObjectStorage.from_settings(settings)
    record: ModelRecord = parallel.share(None)  # type: ignore[assignment]  # rank 0's, once it checked the job
    recipe = job_recipe(settings, storage, job, record, Silent(), TakingPart(), None, parallel=parallel)
    recipe.setup()
    try:
        recipe.train()
    except StopRequested:
        return 0
    recipe.export(None)
    return 0


def main() -> None:
    die_with_parent()  # torchrun killed outright: its ranks go too
    spec = json.loads(Path(sys.argv[1]).read_text())
    job = ClaimedJob(**spec["job"])
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    placement = resolve_placement(rank_device(settings.device), settings.dtype)
    sharded = shards(trains_every_weight=job.method == "full", n_parameters=spec["n_parameters"], placement=placement)
    parallel = from_environment(placement.device, sharded=sharded)
    with job_logging_context(job.id):
        try:
            code = lead(job, parallel, spec) if parallel.is_first else follow(job, parallel)
        except BaseException:
            log.exception("job %s: rank %d stopped", job.id, parallel.rank)
            code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    if code == 0:
        import torch.distributed as dist

        dist.destroy_process_group()
    os._exit(code)  # not waiting for peers that may be gone: torchrun ends the rest


if __name__ == "__main__":
    main()
