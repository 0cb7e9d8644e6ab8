"""The admin commands, on this machine's database: `tuneforge migrate`, `keys`, `models` (add, remove, list --local).

`models list` asks the API unless given --local: it is here with the other `models` commands all the same.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from app.cli import generate
from app.cli.api import ApiKey, ApiUrl
from app.cli.client import DEFAULT_API_URL
from app.cli.output import fail, format_time, log_to_stderr, print_json
from app.core.settings import get_settings

keys_cli = typer.Typer(help="Manage API keys.", no_args_is_help=True)
models_cli = typer.Typer(
    help="Base models: register your own, remove (both on this machine's database); list (from the API).",
    no_args_is_help=True,
)


def migrate() -> None:
    """Create or upgrade the database schema to the latest revision."""
    from app.core.db import migrate as run_migrations

    log_to_stderr()
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


@contextlib.contextmanager
def _exit_on_app_error() -> Iterator[None]:
    """A domain error (no such key, an ambiguous prefix…) ends the command: its message on stderr, exit code 1."""
    from app.core.errors import AppError

    try:
        yield
    except AppError as exc:
        fail(exc.message)


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
            k.prefix,
            k.tenant,
            format_time(k.created_at),
            format_time(k.last_used_at, "never"),
            format_time(k.revoked_at, "active"),
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
    tool_call_format: Annotated[
        str | None,
        typer.Option(
            "--tool-call-format",
            metavar="NAME",
            help="How the chat template writes tool calls (hermes, llama3_json, mistral), where it is not detected: "
            "training files with tool calls need a model with one",
        ),
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
        fail("give exactly one of --path, --gguf, --hf-repo", code=2)
    if revision and not hf_repo:
        fail("--revision goes with --hf-repo", code=2)
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
                    tool_call_format=tool_call_format,
                    description=description,
                    progress=lambda message: typer.echo(f"{model_id}: {message}", err=True),
                )
        except ModelImportError as exc:
            fail(f"{exc}; nothing was registered")
    typer.echo(
        f"registered {record.id}: {record.architecture}, {record.n_parameters:,} parameters, "
        f"max {record.max_seq_length} tokens, chat template: {'yes' if record.chat_template else 'no'}, "
        f"tool calls: {record.tool_call_format or 'no'}"
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
        generate.models_list(api_url, api_key, as_json=as_json)
        return
    from app.core.db import session_scope
    from app.models.schemas import ModelObject
    from app.models.service import list_models

    settings = get_settings()
    with session_scope(_database_url()) as session:
        records = list_models(session)
    objects = [ModelObject.of(r, default_model=settings.default_base_model) for r in records]
    if as_json:
        print_json([o.model_dump() for o in objects])
        return
    generate.print_models([o.model_dump() for o in objects])


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
    from app.models.service import delete_unused_blobs, forget_local_copy, remove_model

    settings = get_settings()
    url = _database_url()
    with _exit_on_app_error(), session_scope(url) as session:
        record = remove_model(session, model_id=model_id)
    storage = ObjectStorage.from_settings(settings)
    with session_scope(url) as session:  # once the removal is committed: the files no model uses any more
        deleted = delete_unused_blobs(session, storage=storage, files=record.files)
    forget_local_copy(ModelStore(settings.models_dir, storage), record)
    typer.echo(f"removed {record.id} ({deleted} stored files deleted)")
