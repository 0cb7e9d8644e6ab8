"""The client commands' shared plumbing: connection options, an API client that ends on an error, tables.

Output: rich tables for people, `--json` for scripts; a command that creates something prints its id alone on
stdout (its report goes to stderr), so that `ID=$(tuneforge …)` works. Errors: one line on stderr, exit code 1
(2 for a usage error). Kept free of the server's imports, so that a command starts in a fraction of a second.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from app.cli.client import DEFAULT_API_URL, ApiError, ClientError, TuneforgeClient
from app.cli.output import fail, print_json

PANEL = "Client: use the service over its API"
CONNECTION = "Connection"
ApiUrl = Annotated[
    str,
    typer.Option("--api-url", envvar="TUNEFORGE_API_URL", help="The API's root URL", rich_help_panel=CONNECTION),
]
ApiKey = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="TUNEFORGE_API_KEY",
        show_default=False,
        help="Your API key (an operator creates one with `tuneforge keys create`)",
        rich_help_panel=CONNECTION,
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of a table")]
Limit = Annotated[int, typer.Option(min=1, max=100, help="How many to list, newest first")]
After = Annotated[
    str | None, typer.Option(metavar="ID", help="List those after this id (the last one of the previous page)")
]

MIN_WRAPPED_WIDTH = 16  # a free-text column of a table is not wrapped narrower than this
UNBOUNDED = 100_000


def _describe(exc: ApiError, api_url: str) -> str:
    if exc.status_code == 404 and exc.code == "not_found" and exc.param is None:  # no such route, not no such id
        return f"{exc.message}: {api_url} has no such route (is --api-url the API's root URL, as {DEFAULT_API_URL}?)"
    if exc.status_code == 401:
        return (
            f"the API key was refused ({exc.message}); check --api-key or TUNEFORGE_API_KEY: a key works only with "
            "the server whose database `tuneforge keys create` wrote it to (it says which)"
        )
    if exc.status_code >= 500:
        return f"the API failed: {exc.message} (HTTP {exc.status_code})"
    if exc.param and exc.param not in exc.message:
        return f"{exc.message} (param: {exc.param})"
    return exc.message


@contextmanager
def connect(api_url: str, api_key: str | None) -> Iterator[TuneforgeClient]:
    """A client of the API; an error of the API or of the connection ends the command with its message."""
    if not api_key:
        fail(
            "no API key: pass --api-key or set TUNEFORGE_API_KEY (an operator creates one with "
            "`tuneforge keys create --tenant NAME`)",
            code=2,
        )
    try:
        with TuneforgeClient(api_url, api_key) as client:
            yield client
    except ApiError as exc:
        fail(_describe(exc, api_url))
    except ClientError as exc:
        fail(exc.message)
    except BrokenPipeError:  # the reader went away (`| head`): nothing more to say, to anyone
        sys.stderr.close()
        raise typer.Exit(1) from None
    except OSError as exc:  # a file to write or read: the path, the disk
        fail(f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        fail(f"unreadable input or answer: {exc}")


def new_table(
    *columns: str, wrap: tuple[str, ...] = (), caption: str | None = "times in UTC", title: str | None = None
) -> Table:
    """A table whose `wrap` columns (free text) wrap to fit the terminal; the others stay on one line (`show_table`)."""
    table = Table(box=box.SIMPLE_HEAD, caption=caption, title=title)
    for column in columns:
        table.add_column(column, no_wrap=column not in wrap, overflow="fold")
    return table


def show_table(table: Table, *, stderr: bool = False) -> None:
    """Print a table whose one-line columns (ids, which are copied, and short values) are never cut: where the
    terminal is too narrow even once the free-text columns have wrapped, the table is drawn wider than the
    terminal, which wraps its lines."""
    for column in table.columns:
        longest = max(cell_len(str(cell)) for cell in [column.header, *column.cells])
        column.min_width = longest if column.no_wrap else min(longest, MIN_WRAPPED_WIDTH)
    console = Console(stderr=stderr)
    needed = Measurement.get(console, console.options.update_width(UNBOUNDED), table).minimum
    if needed > console.width:
        console = Console(stderr=stderr, width=needed)
    console.print(table, crop=False)


def page_caption(page: dict[str, Any], after: str) -> str:
    """The caption of a page: how to get the next one, if there is one."""
    if not page["has_more"] or not page["data"]:
        return "times in UTC"
    return f"times in UTC; more with --after {page['data'][-1][after]}"


def fetch_page(
    api_url: str, api_key: str | None, path: str, *, limit: int, after: object, as_json: bool
) -> dict[str, Any] | None:
    """One page of a list route; with --json printed as it came (and None returned), else returned for a table."""
    with connect(api_url, api_key) as api:
        page: dict[str, Any] = api.get(path, {"limit": limit, "after": after})
    if as_json:
        print_json(page)
        return None
    return page
