"""The `tuneforge` command: its root, `--version`, and the commands of each module, registered in one place.

`admin` writes this machine's database (migrate, keys, models); `servers` runs one role (api, serve, worker);
`supervisor` runs them all (up); `generate`, `files`, `jobs`, `adapters`, `webhooks` and `sweep` use the service
over its API, through `client` and the shared plumbing of `api`.
"""

from __future__ import annotations

from typing import Annotated

import typer

from app.cli import adapters, admin, files, generate, jobs, servers, supervisor, sweeps, webhooks
from app.cli.api import PANEL
from app.cli.client import installed_version

cli = typer.Typer(
    help="Tuneforge: self-hostable fine-tuning-as-a-service. Configure with TUNEFORGE_* environment variables.",
    no_args_is_help=True,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        version = installed_version()
        typer.echo(f"tuneforge {version}" if version else "tuneforge (not installed: version unknown)")
        raise typer.Exit()


@cli.callback()
def _root(
    _version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit")
    ] = False,
) -> None:
    pass


# `tuneforge --help` lists each panel's commands in the order they are added here, the commands before the groups.
cli.command()(admin.migrate)
cli.add_typer(admin.keys_cli, name="keys")
cli.add_typer(admin.models_cli, name="models")
cli.command()(servers.api)
cli.command()(servers.serve)
cli.command()(servers.worker)
cli.command()(supervisor.up)
cli.command("generate", rich_help_panel=PANEL)(generate.generate)
cli.add_typer(files.files_cli, name="files", rich_help_panel=PANEL)
cli.add_typer(jobs.jobs_cli, name="jobs", rich_help_panel=PANEL)
cli.add_typer(adapters.adapters_cli, name="adapters", rich_help_panel=PANEL)
cli.add_typer(webhooks.webhooks_cli, name="webhooks", rich_help_panel=PANEL)
cli.add_typer(sweeps.sweeps_cli, name="sweep", rich_help_panel=PANEL)


def main() -> None:
    cli()
