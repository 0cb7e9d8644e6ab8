"""`tuneforge files`: upload a training file (every line checked), list them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

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
from app.cli.client import DEFAULT_API_URL, ApiError
from app.cli.output import format_time, print_json

files_cli = typer.Typer(help="Training files: upload (every line checked), list.", no_args_is_help=True)


@files_cli.command("upload")
def files_upload(
    path: Annotated[
        Path,
        typer.Argument(
            metavar="FILE", exists=True, dir_okay=False, readable=True, help="A .jsonl file, one example a line"
        ),
    ],
    base_model: Annotated[
        str | None,
        typer.Option("--base-model", help="Whose tokenizer counts the tokens (default: the service's default model)"),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the API's JSON (the file) instead of its id and the report")
    ] = False,
    api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """Upload a JSONL training file and print its id; its validation report goes to stderr as a table.

    Every line is checked first: a file with bad lines is refused, with a table of them (line, code, message),
    exit code 1, and nothing is stored.
    """
    with connect(api_url, api_key) as api:
        try:
            uploaded = api.upload_file(path, base_model=base_model)
        except ApiError as exc:
            if exc.report is not None:
                _print_rejection(exc.report)
            raise
    if as_json:
        print_json(uploaded)
        return
    report = new_table("file", "", wrap=("",), caption=None, title="validation report")
    rows = [
        ("id", uploaded["id"]),
        ("file name", uploaded["filename"]),
        ("format", uploaded["format"]),
        ("examples", f"{uploaded['n_examples']:,}"),
        ("tokens", f"{uploaded['n_tokens']:,} (longest example {uploaded['max_example_tokens']:,})"),
        ("counted with", f"{uploaded['tokenizer_model']}'s tokenizer"),
        ("bytes", f"{uploaded['bytes']:,}"),
    ]
    for row in rows:
        report.add_row(*row)
    show_table(report, stderr=True)
    typer.echo(uploaded["id"])


def _print_rejection(report: dict[str, Any]) -> None:
    errors = report.get("errors", [])
    shown = f"; the first {len(errors)} are listed" if len(errors) < report.get("n_errors", 0) else ""
    table = new_table(
        "line",
        "code",
        "message",
        wrap=("message",),
        caption=f"{report.get('n_errors')} bad line(s) of {report.get('n_lines')}{shown}",
        title="rejected lines",
    )
    for error in errors:
        table.add_row(str(error["line"]), error["code"], error["message"])
    show_table(table, stderr=True)


@files_cli.command("list")
def files_list(
    limit: Limit = 20,
    after: After = None,
    as_json: AsJson = False,
    api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """List your training files, newest first."""
    page = fetch_page(api_url, api_key, "/v1/files", limit=limit, after=after, as_json=as_json)
    if page is None:
        return
    columns = ("id", "file name", "format", "examples", "tokens", "bytes", "created")
    table = new_table(*columns, wrap=("file name",), caption=page_caption(page, "id"))
    for f in page["data"]:
        table.add_row(
            f["id"],
            f["filename"],
            f["format"],
            f"{f['n_examples']:,}",
            f"{f['n_tokens']:,}",
            f"{f['bytes']:,}",
            format_time(f["created_at"]),
        )
    show_table(table)
