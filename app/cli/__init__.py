"""The `tuneforge` command: run the service (embedded or one role at a time), migrate, manage keys and models;
and, in `app.cli.commands`, use the service over its API."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from app.cli import commands
from app.cli.client import DEFAULT_API_URL
from app.cli.commands import ApiKey, ApiUrl
from app.core.settings import get_settings

log = logging.getLogger("tuneforge.up")  # not __name__: that is "__main__" under `python -m app.cli`
KEEP_ALIVE_SECONDS = 75  # as nginx's default: idle connections are closed by the client first

cli = typer.Typer(
    help="Tuneforge: self-hostable fine-tuning-as-a-service. Configure with TUNEFORGE_* environment variables.",
    no_args_is_help=True,
    add_completion=False,
)
keys_cli = typer.Typer(help="Manage API keys.", no_args_is_help=True)
cli.add_typer(keys_cli, name="keys")
models_cli = typer.Typer(
    help="Base models: register your own, remove (both on this machine's database); list (from the API).",
    no_args_is_help=True,
)
cli.add_typer(models_cli, name="models")
commands.register(cli)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"tuneforge {version('tuneforge')}")
        except PackageNotFoundError:
            typer.echo("tuneforge (not installed: version unknown)")
        raise typer.Exit()


@cli.callback()
def _root(
    _version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit")
    ] = False,
) -> None:
    pass


def _logging() -> None:
    """The one log format (TUNEFORGE_LOG_FORMAT) on stderr; uvicorn's and Celery's loggers write through it too."""
    from app.core.logging import configure_logging

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)


@cli.command()
def migrate() -> None:
    """Create or upgrade the database schema to the latest revision."""
    from app.core.db import migrate as run_migrations

    _logging()
    settings = get_settings()
    _say_database(settings.db_url)
    run_migrations(settings.db_url)
    typer.echo("database is at the latest revision", err=True)


def _say_database(url: str) -> None:
    """Say on stderr which database a command uses: a key created in one and used against a server on another is
    refused, and nothing else would tell why."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        in_memory = parsed.database in (None, "", ":memory:")
        where = "SQLite in memory" if in_memory else f"SQLite {Path(str(parsed.database)).resolve()}"
    else:
        where = parsed.render_as_string(hide_password=True)
    typer.echo(f"database: {where}", err=True)


def _database_url() -> str:
    """The database, brought to the latest schema first (so that the key commands work on a fresh install)."""
    from app.core.db import migrate as run_migrations

    url = get_settings().db_url
    _say_database(url)
    run_migrations(url)
    return url


def _check_placement() -> None:
    """Exit with a clear message when TUNEFORGE_DEVICE / TUNEFORGE_DTYPE ask for what this machine lacks."""
    from app.ml.device import PlacementError, resolve_placement

    settings = get_settings()
    try:
        placement = resolve_placement(settings.device, settings.dtype)
    except PlacementError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    logging.getLogger("tuneforge.device").info("models run on %s", placement.describe())


@contextlib.contextmanager
def _exit_on_app_error() -> Iterator[None]:
    """A domain error (no such key, an ambiguous prefix…) ends the command: its message on stderr, exit code 1."""
    from app.core.errors import AppError

    try:
        yield
    except AppError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from None


@keys_cli.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant name; created if it does not exist")],
) -> None:
    """Create an API key for TENANT and print it (the only line on stdout; it is not shown again).

    Its prefix, which names it in `keys list` and `keys revoke`, is printed on stderr.
    """
    from app.auth.service import create_api_key
    from app.core.db import session_scope
    from app.core.security import PREFIX_LENGTH

    with session_scope(_database_url()) as session:
        key = create_api_key(session, tenant_name=tenant)
    typer.echo(key)
    typer.echo(f"created key {key[:PREFIX_LENGTH]} for tenant {tenant}", err=True)


def _when(moment: datetime | None, default: str) -> str:
    return f"{moment:%Y-%m-%d %H:%M}" if moment else default


@keys_cli.command("list")
def keys_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON list (ISO 8601 times in UTC, null when unset)")
    ] = False,
) -> None:
    """List API keys, revoked ones included: prefix, tenant, created, last used (updated once a minute), revoked."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from app.auth.service import list_keys
    from app.core.db import session_scope
    from app.core.security import PREFIX_LENGTH

    with _exit_on_app_error(), session_scope(_database_url()) as session:
        keys = list_keys(session, tenant_name=tenant)
    if as_json:
        typer.echo(json.dumps([asdict(k) for k in keys], indent=2, default=datetime.isoformat))
        return
    table = Table(box=box.SIMPLE_HEAD, caption="times in UTC")
    table.add_column("prefix", no_wrap=True, min_width=PREFIX_LENGTH)  # copied into `keys revoke`: never cut
    table.add_column("tenant", overflow="fold")
    for column in ("created", "last used", "revoked"):
        table.add_column(column)
    for k in keys:
        table.add_row(
            k.prefix, k.tenant, _when(k.created_at, ""), _when(k.last_used_at, "never"), _when(k.revoked_at, "active")
        )
    Console().print(table)


@keys_cli.command("revoke")
def keys_revoke(
    prefix: Annotated[
        str, typer.Argument(metavar="PREFIX", help="The key's prefix as `keys list` shows it, or a start of it")
    ],
) -> None:
    """Revoke the key whose prefix is PREFIX: its next request gets 401.

    Exit code 1, revoking nothing, when no key or several keys match PREFIX.

    Revoking an already revoked key changes nothing: a note on stderr, exit code 0.
    """
    from app.auth.service import KeyAlreadyRevoked, revoke_key
    from app.core.db import session_scope

    with _exit_on_app_error():
        try:
            with session_scope(_database_url()) as session:
                key = revoke_key(session, prefix=prefix)
        except KeyAlreadyRevoked as exc:
            typer.echo(f"{exc.message}; nothing to do", err=True)
            return
    typer.echo(f"revoked key {key.prefix} (tenant {key.tenant})")


@models_cli.command("add")
def models_add(
    model_id: Annotated[str, typer.Argument(metavar="ID", help="Id jobs will name it by (a-z, 0-9, '.', '_', '-')")],
    path: Annotated[
        Path | None,
        typer.Option("--path", help="A Hugging Face model folder: config.json, *.safetensors weights, tokenizer"),
    ] = None,
    gguf: Annotated[Path | None, typer.Option("--gguf", help="A GGUF file (dequantized once, at registration)")] = None,
    hf_repo: Annotated[
        str | None,
        typer.Option("--hf-repo", help="ORG/NAME of a model in the local Hugging Face cache (never downloaded)"),
    ] = None,
    revision: Annotated[
        str | None, typer.Option("--revision", help="With --hf-repo: a branch, tag or commit in the cache")
    ] = None,
    max_seq_length: Annotated[
        int | None,
        typer.Option(help="Longest sequence jobs and /generate may use (default and maximum: the model's positions)"),
    ] = None,
    chat_template: Annotated[
        Path | None, typer.Option("--chat-template", help="A Jinja chat template file, replacing the tokenizer's")
    ] = None,
    description: Annotated[str | None, typer.Option(help="Shown in GET /v1/models")] = None,
) -> None:
    """Register a base model: check it, copy its files into the object store, add it to the database.

    Give exactly one of --path, --gguf, --hf-repo.

    The model: a causal LM that transformers loads without custom code, with safetensors weights and a tokenizer.

    Workers and API replicas fetch the files from the object store on first use and verify their checksums.
    """
    from app.core.db import session_scope
    from app.core.storage import ObjectStorage
    from app.ml.models import ModelStore
    from app.ml.models.importing import ModelImportError
    from app.models.service import register_model

    sources = [(name, value) for name, value in (("path", path), ("gguf", gguf), ("hf-repo", hf_repo)) if value]
    if len(sources) != 1:
        typer.echo("error: give exactly one of --path, --gguf, --hf-repo", err=True)
        raise typer.Exit(2)
    if revision and not hf_repo:
        typer.echo("error: --revision goes with --hf-repo", err=True)
        raise typer.Exit(2)
    source, location = sources[0]
    settings = get_settings()
    url = _database_url()
    storage = ObjectStorage.from_settings(settings)
    with _exit_on_app_error():
        try:
            with session_scope(url) as session:
                record = register_model(
                    session,
                    store=ModelStore(settings.models_dir, storage),
                    storage=storage,
                    scratch_dir=settings.tmp_dir,
                    model_id=model_id,
                    source=source,  # type: ignore[arg-type]
                    location=str(location),
                    hf_revision=revision,
                    max_seq_length=max_seq_length,
                    chat_template_file=chat_template,
                    description=description,
                    progress=lambda message: typer.echo(f"{model_id}: {message}", err=True),
                )
        except ModelImportError as exc:
            typer.echo(f"error: {exc}; nothing was registered", err=True)
            raise typer.Exit(1) from None
    typer.echo(
        f"registered {record.id}: {record.architecture}, {record.n_parameters:,} parameters, "
        f"max {record.max_seq_length} tokens, chat template: {'yes' if record.chat_template else 'no'}"
    )


@models_cli.command("list")
def models_list(
    local: Annotated[
        bool,
        typer.Option(
            "--local",
            help="Read this machine's database (the TUNEFORGE_* settings) instead of the API: the base models only, "
            "no key needed",
        ),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the API's JSON (with --local: a JSON list of the base models)")
    ] = False,
    api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """List the models from the API (GET /v1/models): the base models jobs can fine-tune, then your adapters.

    With --local: the base models (built-in and registered) in this machine's database, as an operator sees them.
    """
    if not local:
        commands.models_list(api_url, api_key, as_json=as_json)
        return
    from app.core.db import session_scope
    from app.models.schemas import ModelObject
    from app.models.service import list_models

    settings = get_settings()
    with session_scope(_database_url()) as session:
        records = list_models(session)
    objects = [ModelObject.of(r, default_model=settings.default_base_model) for r in records]
    if as_json:
        typer.echo(json.dumps([o.model_dump() for o in objects], indent=2))
        return
    commands.print_models([o.model_dump() for o in objects])


@models_cli.command("remove")
def models_remove(
    model_id: Annotated[str, typer.Argument(metavar="ID", help="A registered model's id")],
) -> None:
    """Remove a registered model and the files only it used; refused while a queued or running job uses it.

    Adapters trained on it stay listed and downloadable, but /generate can no longer serve them.
    """
    from app.core.db import session_scope
    from app.core.storage import ObjectStorage
    from app.ml.models import ModelStore
    from app.models.service import forget_local_copy, remove_model

    settings = get_settings()
    url = _database_url()
    with _exit_on_app_error(), session_scope(url) as session:
        record, orphans = remove_model(session, model_id=model_id)
    storage = ObjectStorage.from_settings(settings)
    for key in orphans:
        storage.delete(key)
    forget_local_copy(ModelStore(settings.models_dir, storage), record)
    typer.echo(f"removed {record.id} ({len(orphans)} stored files deleted)")


@cli.command()
def api(
    host: Annotated[str | None, typer.Option(help="Bind address (default: TUNEFORGE_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: TUNEFORGE_PORT)")] = None,
) -> None:
    """Run the HTTP API (and the serving engine for /generate)."""
    import uvicorn

    from app.main import create_app

    _logging()
    _check_placement()
    settings = get_settings()
    uvicorn.run(
        create_app(settings),
        host=host or settings.host,
        port=port or settings.port,
        log_level="info",
        log_config=None,  # keep the handler _logging() installed
        access_log=False,  # the app logs each request itself, with its request id
        # Longer than clients keep an idle connection (httpx and the openai client: 5 s, uvicorn's default too):
        # a server that closes first races the client's next request on that connection, which then fails.
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
    )


@cli.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default: TUNEFORGE_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: TUNEFORGE_PORT)")] = None,
) -> None:
    """Run a serving replica: the inference routes only (/generate, /v1/completions, /v1/chat/completions,
    /v1/models) on the batching engine, with the same database, object store and settings as the API. Run as
    many as the traffic needs behind a load balancer; `tuneforge api` serves the same routes too."""
    import uvicorn

    from app.main import create_app

    _logging()
    _check_placement()
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


@cli.command()
def worker() -> None:
    """Run a Celery training worker on TUNEFORGE_QUEUE_NAME: one job at a time, on TUNEFORGE_DEVICE.

    A worker that trains on CUDA with bitsandbytes installed also takes the jobs that need it (qlora), from
    <TUNEFORGE_QUEUE_NAME>-cuda.

    Run one worker per GPU, each with its own CUDA_VISIBLE_DEVICES (e.g. CUDA_VISIBLE_DEVICES=1 tuneforge worker).

    Ctrl-C or SIGTERM: the running job is checkpointed after its current step and put back in the queue, where
    the next worker resumes it. The worker also re-queues jobs whose worker died (a stale heartbeat).
    """
    from app.jobs.state import worker_queues
    from app.ml.device import cuda_training_available
    from worker.celery_app import celery_app

    _logging()
    _check_placement()
    settings = get_settings()
    queues = worker_queues(settings, trains_on_cuda=cuda_training_available(settings.device))
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


# `up` restarts a child that exits on its own after RESTART_DELAY_MIN seconds, doubling the delay while it keeps
# crashing, up to RESTART_DELAY_MAX; a child that ran for STABLE_AFTER seconds starts again from the minimum.
RESTART_DELAY_MIN = 1.0
RESTART_DELAY_MAX = 30.0
STABLE_AFTER = 60.0
# Warm shutdown first: the API drains; the worker stops a running job at its next step and marks it failed
# with the reason. Then a cold shutdown (SIGQUIT), then SIGKILL for whatever is still alive: (signal, grace in s).
STOP_SEQUENCE = ((signal.SIGTERM, 10.0), (signal.SIGQUIT, 15.0), (signal.SIGKILL, 5.0))


def _describe_exit(returncode: int) -> str:
    if returncode >= 0:
        return f"exit code {returncode}"
    with contextlib.suppress(ValueError):
        return f"signal {signal.Signals(-returncode).name}"
    return f"signal {-returncode}"


@dataclass
class Supervised:
    """A child process of `up` (the API or the worker), restarted whenever it exits on its own."""

    role: str
    args: list[str]
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    delay: float = RESTART_DELAY_MIN  # before the next restart
    restart_at: float | None = None  # set while the child waits to be started again

    def start(self) -> None:
        self.process = subprocess.Popen(self.args)
        self.started_at, self.restart_at = time.monotonic(), None
        log.info("started %s (pid %d)", self.role, self.process.pid)

    def watch(self) -> None:
        """Schedule a restart when the child has exited; start it again when its delay has passed."""
        now = time.monotonic()
        if self.restart_at is not None:
            if now >= self.restart_at:
                self.start()
            return
        assert self.process is not None
        returncode = self.process.poll()
        if returncode is None:
            return
        if now - self.started_at >= STABLE_AFTER:
            self.delay = RESTART_DELAY_MIN
        log.warning(
            "%s (pid %d) exited with %s; restarting in %.1f s",
            self.role,
            self.process.pid,
            _describe_exit(returncode),
            self.delay,
        )
        self.restart_at = now + self.delay
        self.delay = min(2 * self.delay, RESTART_DELAY_MAX)


def _stop_all(children: list[Supervised]) -> None:
    for sig, grace in STOP_SEQUENCE:
        alive = [c.process for c in children if c.process is not None and c.process.poll() is None]
        for process in alive:
            process.send_signal(sig)
        deadline = time.monotonic() + grace
        for process in alive:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))


@cli.command()
def up(
    host: Annotated[str | None, typer.Option(help="Bind address (default: TUNEFORGE_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: TUNEFORGE_PORT)")] = None,
) -> None:
    """Run everything on this machine: migrate, then the API and one worker. Ctrl-C (or SIGTERM) stops both; a
    running job is checkpointed and queued again, and the next `tuneforge up` resumes it.

    A crashed API or worker (any exit of its own, even kill -9) is restarted; starts, exits and restarts go to stderr.

    The restart waits 1 s, doubling while the child keeps crashing (at most 30 s), back to 1 s after a minute up.

    On first start (no tenant yet) it creates the tenant `default` and prints its API key.
    """
    from app.auth.service import count_tenants, create_api_key
    from app.core.db import migrate as run_migrations
    from app.core.db import session_scope

    _logging()
    _check_placement()
    settings = get_settings()
    run_migrations(settings.db_url)
    with session_scope(settings.db_url) as session:
        if count_tenants(session) == 0:
            key = create_api_key(session, tenant_name="default")
            typer.echo(f"Created tenant 'default'. API key (shown once): {key}")
    log.info("Tuneforge on http://%s:%s  data: %s", host or settings.host, port or settings.port, settings.data_dir)
    me = [sys.executable, "-m", "app.cli"]
    api_args = [*me, "api"] + (["--host", host] if host else []) + (["--port", str(port)] if port else [])
    children = [Supervised("api", api_args), Supervised("worker", [*me, "worker"])]

    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    # Before the children start, so that no signal can leave them running without us.
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for child in children:
        child.start()
    while not stopping:
        for child in children:
            if not stopping:
                child.watch()
        time.sleep(0.5)
    log.info("stopping the API and the worker")
    _stop_all(children)


def main() -> None:
    cli()
