"""`tuneforge adapters`: list your trained adapters, download one as a .tar.gz, delete one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from app.cli.api import (
    After,
    ApiKey,
    ApiUrl,
    AsJson,
    Limit,
    connect,
    fetch_page,
    new_table,
    page_caption,
    show_table,
)
from app.cli.client import DEFAULT_API_URL
from app.cli.output import format_time, print_json

adapters_cli = typer.Typer(help="Trained adapters: list, download, delete.", no_args_is_help=True)


@adapters_cli.command("list")
def adapters_list(
    limit: Limit = 20,
    after: After = None,
    as_json: AsJson = False,
    api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """List your adapters, newest first."""
    page = fetch_page(api_url, api_key, "/adapters", limit=limit, after=after, as_json=as_json)
    if page is None:
        return
    columns = ("id", "name", "model", "method", "format", "bytes", "created")
    table = new_table(*columns, wrap=("name", "model"), caption=page_caption(page, "id"))
    for a in page["data"]:
        table.add_row(
            a["id"],
            a["name"] or "",
            a["base_model"],
            a["method"],
            a["format"],
            f"{a['size_bytes']:,}",
            format_time(a["created_at"]),
        )
    show_table(table)


@adapters_cli.command("download")
def adapters_download(
    adapter_id: Annotated[str, typer.Argument(metavar="ID", help="An adapter's id, or a job checkpoint's (ftckpt-…)")],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="The file to write, or a folder to write ID.tar.gz in (default: ./ID.tar.gz)"
        ),
    ] = None,
    api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """Download an adapter as a .tar.gz (the artifact and its tuneforge.json manifest) and print the file's path.

    The file appears once complete and its sha256 checked (an existing file is replaced).
    """
    destination = output or Path(f"{adapter_id}.tar.gz")
    if destination.is_dir():
        destination = destination / f"{adapter_id}.tar.gz"
    with connect(api_url, api_key) as api:
        size, sha256 = api.download(f"/adapters/{adapter_id}/download", destination)
    typer.echo(f"downloaded {size:,} bytes, sha256 {sha256} (checked)", err=True)
    typer.echo(str(destination))


@adapters_cli.command("delete")
def adapters_delete(
    adapter_id: Annotated[str, typer.Argument(metavar="ID", help="An adapter's id")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON")] = False,
    api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """Delete an adapter and its stored archive (it no longer counts against your stored bytes).

    A generation already running with it finishes; new ones are refused. Its job keeps its record.
    """
    with connect(api_url, api_key) as api:
        deleted = api.delete(f"/adapters/{adapter_id}")
    if as_json:
        print_json(deleted)
        return
    typer.echo(f"adapter {deleted['id']}: deleted")
