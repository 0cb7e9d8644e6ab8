"""The `tuneforge` command: run the service (embedded or one role at a time), migrate, manage keys."""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import sys
import time
from typing import Annotated

import typer

from app.core.settings import get_settings

cli = typer.Typer(
    help="Tuneforge: self-hostable fine-tuning-as-a-service. Configure with TUNEFORGE_* environment variables.",
    no_args_is_help=True,
    add_completion=False,
)
keys_cli = typer.Typer(help="Manage API keys.", no_args_is_help=True)
cli.add_typer(keys_cli, name="keys")


def _logging() -> None:
    logging.basicConfig(
        level=get_settings().log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@cli.command()
def migrate() -> None:
    """Create or upgrade the database schema to the latest revision."""
    from app.core.db import migrate as run_migrations

    _logging()
    settings = get_settings()
    run_migrations(settings.db_url)
    typer.echo("database is at the latest revision", err=True)


@keys_cli.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant name; created if it does not exist")],
) -> None:
    """Create an API key for TENANT and print it (the only line on stdout; it is not shown again)."""
    from app.auth.service import create_api_key
    from app.core.db import migrate as run_migrations
    from app.core.db import session_scope

    settings = get_settings()
    run_migrations(settings.db_url)
    with session_scope(settings.db_url) as session:
        key = create_api_key(session, tenant_name=tenant)
    typer.echo(key)


@cli.command()
def api(
    host: Annotated[str | None, typer.Option(help="Bind address (default: TUNEFORGE_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: TUNEFORGE_PORT)")] = None,
) -> None:
    """Run the HTTP API (and the serving engine for /generate)."""
    import uvicorn

    from app.main import create_app

    _logging()
    settings = get_settings()
    uvicorn.run(create_app(settings), host=host or settings.host, port=port or settings.port, log_level="info")


@cli.command()
def worker() -> None:
    """Run a Celery training worker on TUNEFORGE_QUEUE_NAME: one job at a time; run one per GPU."""
    from worker.celery_app import celery_app

    settings = get_settings()
    celery_app.worker_main(
        [
            "worker",
            "--loglevel=INFO",
            # solo: the job runs in this process, so the base model stays cached between jobs.
            "--pool=solo",
            f"--queues={settings.queue_name}",
            "--without-gossip",
            "--without-mingle",
        ]
    )


@cli.command()
def up(
    host: Annotated[str | None, typer.Option(help="Bind address (default: TUNEFORGE_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: TUNEFORGE_PORT)")] = None,
) -> None:
    """Run everything on this machine: migrate, then the API and one worker. Ctrl-C stops both.

    On first start (no tenant yet) it creates the tenant `default` and prints its API key.
    """
    from app.auth.service import count_tenants, create_api_key
    from app.core.db import migrate as run_migrations
    from app.core.db import session_scope

    _logging()
    settings = get_settings()
    run_migrations(settings.db_url)
    with session_scope(settings.db_url) as session:
        if count_tenants(session) == 0:
            key = create_api_key(session, tenant_name="default")
            typer.echo(f"Created tenant 'default'. API key (shown once): {key}")
    typer.echo(
        f"Tuneforge on http://{host or settings.host}:{port or settings.port}  data: {settings.data_dir}", err=True
    )
    me = [sys.executable, "-m", "app.cli"]
    api_args = [*me, "api"] + (["--host", host] if host else []) + (["--port", str(port)] if port else [])
    children = [subprocess.Popen(api_args), subprocess.Popen([*me, "worker"])]

    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while not stopping and all(c.poll() is None for c in children):
        time.sleep(0.5)
    # Warm shutdown first: the API drains; the worker stops a running job at its next step and marks it
    # failed with the reason. Then a cold shutdown (SIGQUIT), then SIGKILL for whatever is still alive.
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGQUIT, 15.0), (signal.SIGKILL, 5.0)):
        alive = [c for c in children if c.poll() is None]
        for child in alive:
            child.send_signal(sig)
        deadline = time.monotonic() + grace
        for child in alive:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
    failed = [c for c in children if c.returncode not in (0, -signal.SIGTERM, -signal.SIGINT)]
    raise typer.Exit(1 if failed and not stopping else 0)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
