"""The server roles one process at a time: `tuneforge api`, `serve` and `worker`, and the checks they share."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from app.cli.output import fail, log_to_stderr
from app.core.settings import get_settings

KEEP_ALIVE_SECONDS = 75  # as nginx's default: idle connections are closed by the client first


def check_placement() -> None:
    """Exit with a clear message when TUNEFORGE_DEVICE / TUNEFORGE_DTYPE ask for what this machine lacks."""
    from app.ml.device import PlacementError, resolve_placement

    settings = get_settings()
    try:
        placement = resolve_placement(settings.device, settings.dtype)
    except PlacementError as exc:
        fail(str(exc))
    logging.getLogger("tuneforge.device").info("models run on %s", placement.describe())


def api(
    host: Annotated[str | None, typer.Option(help="Bind address (default: TUNEFORGE_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: TUNEFORGE_PORT)")] = None,
) -> None:
    """Run the HTTP API (and the serving engine for /generate)."""
    import uvicorn

    from app.main import create_app

    log_to_stderr()
    check_placement()
    settings = get_settings()
    uvicorn.run(
        create_app(settings),
        host=host or settings.host,
        port=port or settings.port,
        log_level="info",
        log_config=None,  # keep the handler log_to_stderr() installed
        access_log=False,  # the app logs each request itself, with its request id
        # Longer than clients keep an idle connection (httpx and the openai client: 5 s, uvicorn's default too):
        # a server that closes first races the client's next request on that connection, which then fails.
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
    )


def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default: TUNEFORGE_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: TUNEFORGE_PORT)")] = None,
) -> None:
    """Run a serving replica: the inference routes only (/generate, /v1/completions, /v1/chat/completions,
    /v1/models) on the batching engine, with the same database, object store and settings as the API. Run as
    many as the traffic needs behind a load balancer; `tuneforge api` serves the same routes too."""
    import uvicorn

    from app.main import create_app

    log_to_stderr()
    check_placement()
    settings = get_settings()
    uvicorn.run(
        create_app(settings, role="serve"),
        host=host or settings.host,
        port=port or settings.port,
        log_level="info",
        log_config=None,
        access_log=False,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
    )


def worker(
    devices: Annotated[
        str | None,
        typer.Option(
            help="The devices this worker owns (default: TUNEFORGE_WORKER_DEVICES, 1): a count, or CUDA indices "
            "(0,1,2,3). On a CPU a count N means N gloo processes for a job that asks for N devices"
        ),
    ] = None,
) -> None:
    """Run a Celery training worker on TUNEFORGE_QUEUE_NAME: one job at a time, on TUNEFORGE_DEVICE.

    A worker that trains on CUDA with bitsandbytes installed also takes the jobs that need it (qlora), from
    <TUNEFORGE_QUEUE_NAME>-cuda.

    One GPU per worker: run one worker per GPU, each with its own CUDA_VISIBLE_DEVICES (e.g. CUDA_VISIBLE_DEVICES=1
    tuneforge worker). Several: `--devices 0,1,2,3` takes the jobs that ask for up to 4 devices
    ("resources": {"devices": 4}) as well as 1-device jobs, and runs a job's ranks under torchrun, one per device.

    Ctrl-C or SIGTERM: the running job is checkpointed after its current step and put back in the queue, where
    the next worker resumes it. The worker also re-queues jobs whose worker died (a stale heartbeat).
    """
    import os

    from app.jobs.state import worker_queues
    from app.ml.device import PlacementError, WorkerDevices, cuda_training_available

    log_to_stderr()
    try:
        owned = WorkerDevices.parse(devices if devices is not None else get_settings().worker_devices)
    except PlacementError as exc:
        fail(str(exc))
    if devices is not None:  # what the job runner and the worker's row read
        os.environ["TUNEFORGE_WORKER_DEVICES"] = devices
        get_settings.cache_clear()
    settings = get_settings()
    if owned.cuda_indices is not None:  # before CUDA starts in this process: what it and its ranks see
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(index) for index in owned.cuda_indices)
    check_placement()
    check_devices(owned.count)
    from worker.celery_app import celery_app

    queues = worker_queues(settings, trains_on_cuda=cuda_training_available(settings.device), devices=owned.count)
    logging.getLogger("tuneforge.worker").info("taking jobs from %s", ", ".join(queues))
    celery_app.worker_main(
        # JSON logs: no startup banner either (the line above says what a person needs from it).
        (["--quiet"] if settings.log_format == "json" else [])
        + [
            "worker",
            f"--loglevel={settings.log_level.upper()}",
            # solo: the job runs in this process, so the base model stays cached between jobs.
            "--pool=solo",
            f"--queues={','.join(queues)}",
            "--without-gossip",
            "--without-mingle",
        ]
    )


def check_devices(count: int) -> None:
    """Exit with a clear message when the worker is to own more CUDA devices than it sees, or CUDA indices on a
    CPU."""
    from app.ml.device import resolve_placement

    settings = get_settings()
    placement = resolve_placement(settings.device, settings.dtype)
    if placement.device.type == "cuda":
        import torch

        if count > torch.cuda.device_count():
            fail(f"this worker is to own {count} devices but sees {torch.cuda.device_count()} CUDA device(s)")
    elif "," in settings.worker_devices:
        fail(
            f"TUNEFORGE_WORKER_DEVICES={settings.worker_devices} names CUDA devices, and this worker trains on the "
            f"{placement.device.type}; give a count instead"
        )
