"""The `tuneforge` commands that use the service over its HTTP API: files, jobs, adapters, models list, generate.

Output: rich tables for people, `--json` for scripts; a command that creates something prints its id alone on
stdout (its report goes to stderr), so that `ID=$(tuneforge …)` works. Errors: one line on stderr, exit code 1
(2 for a usage error). Kept free of the server's imports, so that a command starts in a fraction of a second
(`jobs watch` alone reads the job states from app.jobs.state, as it starts following a job for minutes).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from app.cli.client import DEFAULT_API_URL, ApiError, ApiUnreachable, ClientError, TuneforgeClient
from app.cli.output import fail, format_time, print_json

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

RECONNECT_DELAY_SECONDS = 1.0
RETRIED_STATUSES = (502, 503, 504)  # a proxy or the API restarting: `jobs watch` tries again
RECONNECT_GIVE_UP_SECONDS = 60.0  # of failed reconnections in a row
MIN_WRAPPED_WIDTH = 16  # a free-text column of a table is not wrapped narrower than this
UNBOUNDED = 100_000

files_cli = typer.Typer(help="Training files: upload (every line checked), list.", no_args_is_help=True)
jobs_cli = typer.Typer(help="Fine-tuning jobs: create, list, get, watch, events, cancel.", no_args_is_help=True)
adapters_cli = typer.Typer(help="Trained adapters: list, download.", no_args_is_help=True)


# --- plumbing ---------------------------------------------------------------------------------------------------


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
def _api(api_url: str, api_key: str | None) -> Iterator[TuneforgeClient]:
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


def _human(n: int) -> str:
    """134515008 -> 134.5M: short enough for a table in 80 columns."""
    for limit, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= limit:
            return f"{n / limit:.1f}{suffix}"
    return str(n)


def _table(
    *columns: str, wrap: tuple[str, ...] = (), caption: str | None = "times in UTC", title: str | None = None
) -> Table:
    """A table whose `wrap` columns (free text) wrap to fit the terminal; the others stay on one line (`_show`)."""
    table = Table(box=box.SIMPLE_HEAD, caption=caption, title=title)
    for column in columns:
        table.add_column(column, no_wrap=column not in wrap, overflow="fold")
    return table


def _show(table: Table, *, stderr: bool = False) -> None:
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


def _more(page: dict[str, Any], after: str) -> str:
    """The caption of a page: how to get the next one, if there is one."""
    if not page["has_more"] or not page["data"]:
        return "times in UTC"
    return f"times in UTC; more with --after {page['data'][-1][after]}"


# --- files ------------------------------------------------------------------------------------------------------
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
    with _api(api_url, api_key) as api:
        try:
            uploaded = api.upload_file(path, base_model=base_model)
        except ApiError as exc:
            if exc.report is not None:
                _print_rejection(exc.report)
            raise
    if as_json:
        print_json(uploaded)
        return
    report = _table("file", "", wrap=("",), caption=None, title="validation report")
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
    _show(report, stderr=True)
    typer.echo(uploaded["id"])


def _print_rejection(report: dict[str, Any]) -> None:
    errors = report.get("errors", [])
    shown = f"; the first {len(errors)} are listed" if len(errors) < report.get("n_errors", 0) else ""
    table = _table(
        "line",
        "code",
        "message",
        wrap=("message",),
        caption=f"{report.get('n_errors')} bad line(s) of {report.get('n_lines')}{shown}",
        title="rejected lines",
    )
    for error in errors:
        table.add_row(str(error["line"]), error["code"], error["message"])
    _show(table, stderr=True)


@files_cli.command("list")
def files_list(
    limit: Limit = 20,
    after: After = None,
    as_json: AsJson = False,
    api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """List your training files, newest first."""
    with _api(api_url, api_key) as api:
        page = api.get("/v1/files", {"limit": limit, "after": after})
    if as_json:
        print_json(page)
        return
    columns = ("id", "file name", "format", "examples", "tokens", "bytes", "created")
    table = _table(*columns, wrap=("file name",), caption=_more(page, "id"))
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
    _show(table)


# --- jobs -------------------------------------------------------------------------------------------------------
def _hyperparameters(as_object: str | None, pairs: list[str]) -> dict[str, Any]:
    """--hyperparameters JSON, then each -H KEY=VALUE over it (VALUE as JSON when it parses, else a string)."""
    merged: dict[str, Any] = {}
    if as_object is not None:
        try:
            merged = json.loads(as_object)
        except ValueError as exc:
            raise typer.BadParameter(f"not JSON: {exc}", param_hint="--hyperparameters") from None
        if not isinstance(merged, dict):
            raise typer.BadParameter("must be a JSON object", param_hint="--hyperparameters")
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="-H / --hyperparameter")
        try:
            merged[key.strip()] = json.loads(value)
        except ValueError:
            merged[key.strip()] = value
    return merged


@jobs_cli.command("create")
def jobs_create(
    training_file: Annotated[
        str, typer.Option("--training-file", metavar="FILE_ID", help="An uploaded file's id (`files upload`)")
    ],
    model: Annotated[
        str | None, typer.Option("--model", help="The base model to fine-tune (default: the service's default)")
    ] = None,
    method: Annotated[
        str | None, typer.Option(help="The fine-tuning method, e.g. lora, qlora, full (default: lora)")
    ] = None,
    validation_file: Annotated[
        str | None, typer.Option("--validation-file", metavar="FILE_ID", help="An uploaded file to evaluate on")
    ] = None,
    suffix: Annotated[
        str | None, typer.Option(help="Appended to the adapter's name (A-Z, a-z, 0-9, '.', '_', '-')")
    ] = None,
    hyperparameters: Annotated[
        str | None,
        typer.Option("--hyperparameters", metavar="JSON", help='A JSON object, e.g. \'{"n_epochs": 3, "lora_r": 8}\''),
    ] = None,
    hyperparameter: Annotated[
        list[str] | None,
        typer.Option(
            "--hyperparameter",
            "-H",
            metavar="KEY=VALUE",
            help="One hyperparameter, e.g. -H n_epochs=3 -H target_modules=all-linear (repeat it; VALUE is read as "
            "JSON when it is JSON, else as a string; it overrides the same key in --hyperparameters)",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Check everything and print the plan (steps, tokens); create nothing")
    ] = False,
    watch: Annotated[
        bool, typer.Option("--watch", help="Then follow it as `jobs watch` does (and print the adapter id)")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON (the job) instead of its id")] = False,
    api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """Create a fine-tuning job and print its id (with --watch: follow it and print its adapter's id).

    With --json: the job as the API answers it; with --json --watch: JSON lines, the job and then its events.
    """
    if dry_run and watch:
        raise typer.BadParameter("a dry run creates no job to watch", param_hint="--watch")
    body: dict[str, Any] = {
        "training_file": training_file,
        "hyperparameters": _hyperparameters(hyperparameters, hyperparameter or []),
    }
    optional = {"base_model": model, "method": method, "validation_file": validation_file, "suffix": suffix}
    body.update({k: v for k, v in optional.items() if v is not None})
    if dry_run:
        body["dry_run"] = True
    with _api(api_url, api_key) as api:
        job = api.post("/jobs", body)
        if dry_run:
            _print_plan(job, as_json)
            return
        if as_json:
            typer.echo(json.dumps(job) if watch else json.dumps(job, indent=2))
        else:
            typer.echo(f"created job {job['id']}: {job['method']} on {job['base_model']}, {job['status']}", err=True)
            if not watch:
                typer.echo(job["id"])
        if watch:
            _watch(api, job["id"], as_json=as_json)


def _print_plan(plan: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(plan)
        return
    duration = plan["estimated_duration_seconds"]
    rows = [
        ("base model", plan["base_model"]),
        ("examples", f"{plan['train_examples']:,} to train on, {plan['held_out_examples']:,} held out"),
        ("steps", f"{plan['total_steps']:,} ({plan['steps_per_epoch']:,} an epoch)"),
        ("tokens an epoch", f"at most {plan['train_tokens_per_epoch']:,}"),
        ("duration", str(timedelta(seconds=duration)) if duration is not None else "unknown"),
        ("estimated from", plan["estimate_basis"]),
        ("hyperparameters", json.dumps(plan["hyperparameters"])),
    ]
    table = _table("dry run", "", wrap=("",), caption="nothing was created")
    for row in rows:
        table.add_row(*row)
    _show(table)


def _progress_text(job: dict[str, Any]) -> str:
    progress = job["progress"]
    return f"{progress['step']}/{progress['total_steps']}" if progress["total_steps"] else ""


@jobs_cli.command("list")
def jobs_list(
    limit: Limit = 20,
    after: After = None,
    as_json: AsJson = False,
    api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """List your jobs, newest first."""
    with _api(api_url, api_key) as api:
        page = api.get("/jobs", {"limit": limit, "after": after})
    if as_json:
        print_json(page)
        return
    columns = ("id", "status", "model", "method", "step", "adapter", "created")
    table = _table(*columns, wrap=("model",), caption=_more(page, "id"))
    for job in page["data"]:
        table.add_row(
            job["id"],
            job["status"],
            job["base_model"],
            job["method"],
            _progress_text(job),
            job["adapter_id"] or "",
            format_time(job["created_at"]),
        )
    _show(table)


JobId = Annotated[str, typer.Argument(metavar="JOB_ID", help="A job's id (ftjob-…)")]


@jobs_cli.command("get")
def jobs_get(job_id: JobId, as_json: AsJson = False, api_url: ApiUrl = DEFAULT_API_URL, api_key: ApiKey = None) -> None:
    """Show a job: status, progress, latest metrics, adapter or error."""
    with _api(api_url, api_key) as api:
        job = api.get(f"/jobs/{job_id}")
    if as_json:
        print_json(job)
        return
    metrics = job["metrics"]
    rows = [
        ("id", job["id"]),
        ("status", job["status"] + (f" (attempt {job['attempt']})" if job["attempt"] > 1 else "")),
        ("model", job["base_model"]),
        ("method", job["method"]),
        ("step", _progress_text(job) or str(job["progress"]["step"])),
        ("epoch", str(job["progress"]["epoch"])),
        ("train loss", str(metrics.get("train_loss", ""))),
        ("valid loss", str(metrics.get("valid_loss", ""))),
        ("device", " ".join(x for x in (job["device"], job["dtype"]) if x)),
        ("training file", job["training_file"]),
        ("validation file", job["validation_file"] or ""),
        ("hyperparameters", json.dumps(job["hyperparameters"])),
        ("created", format_time(job["created_at"])),
        ("started", format_time(job["started_at"])),
        ("finished", format_time(job["finished_at"])),
        ("estimated finish", format_time(job["estimated_finish"])),
        ("adapter", job["adapter_id"] or ""),
        ("error", f"{job['error']['message']} ({job['error']['code']})" if job["error"] else ""),
    ]
    table = _table("job", "", wrap=("",))
    for row in rows:
        if row[1]:
            table.add_row(*row)
    _show(table)


@jobs_cli.command("events")
def jobs_events(
    job_id: JobId,
    after: Annotated[int, typer.Option(metavar="SEQ", min=0, help="List the events after this seq")] = 0,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many to list, in seq order")] = 100,
    as_json: AsJson = False,
    api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """List a job's events in order: status changes, per-step metrics, evaluations (`jobs watch` follows them)."""
    with _api(api_url, api_key) as api:
        page = api.get(f"/jobs/{job_id}/events", {"after": after, "limit": limit})
    if as_json:
        print_json(page)
        return
    table = _table("seq", "time", "type", "message", wrap=("message",), caption=_more(page, "seq"))
    for event in page["data"]:
        style = "red" if event["level"] == "error" else None
        table.add_row(str(event["seq"]), format_time(event["created_at"]), event["type"], event["message"], style=style)
    _show(table)


@jobs_cli.command("cancel")
def jobs_cancel(
    job_id: JobId,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON (the job)")] = False,
    api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """Cancel a job: a queued one never starts, a running one stops within a step and publishes nothing.

    Exit code 1 if it has already ended.
    """
    with _api(api_url, api_key) as api:
        job = api.post(f"/jobs/{job_id}/cancel")
    if as_json:
        print_json(job)
        return
    typer.echo(f"job {job['id']}: {job['status']}")


@jobs_cli.command("watch")
def jobs_watch(
    job_id: JobId,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print each event as a line of JSON instead of the progress bar")
    ] = False,
    api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """Follow a job until it ends: a progress bar (step/total, loss, ETA) and its messages on stderr, from its
    first event on.

    It succeeds: its adapter's id on stdout (not with --json), exit code 0. It fails or is cancelled: the reason
    on stderr, exit code 1.
    A dropped connection is resumed where it stopped.
    """
    with _api(api_url, api_key) as api:
        _watch(api, job_id, as_json=as_json)


class _WatchView:
    """The progress bar of `jobs watch` on stderr, with the job's messages printed above it."""

    def __init__(self, api: TuneforgeClient, job: dict[str, Any]) -> None:
        self.api = api
        self.job_id = job["id"]
        self.total: int | None = job["progress"]["total_steps"]
        self.pace_from: tuple[int, int] | None = None  # (step, time) of this attempt's first metrics event
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("ETA {task.fields[eta]}"),
            console=Console(stderr=True),
        )
        loss = job["metrics"].get("train_loss")
        self.task = self.progress.add_task(
            job["status"],
            total=self.total,
            completed=job["progress"]["step"],
            loss=f"{loss:.4f}" if loss is not None else "-",
            eta="-",
        )

    def __enter__(self) -> _WatchView:
        self.progress.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.progress.stop()

    def show(self, event: dict[str, Any]) -> None:
        data = event["data"]
        if event["type"] == "status":
            self.progress.update(self.task, description=data.get("status", ""))
            if data.get("status") == "running":
                self.pace_from = None  # a new attempt: its own pace
        if "step" in data and self.total is None:
            self.total = self.api.get(f"/jobs/{self.job_id}")["progress"]["total_steps"]
            self.progress.update(self.task, total=self.total)
        if event["type"] == "metrics":
            self._step(event["data"]["step"], event["created_at"], data.get("train_loss"))
        else:
            style = "red" if event["level"] == "error" else "dim"
            self.progress.console.print(f"{event['message']}", style=style, highlight=False)

    def _step(self, step: int, at: int, loss: float | None) -> None:
        eta = "-"
        if self.pace_from is None:
            self.pace_from = (step, at)
        elif self.total is not None and step > self.pace_from[0]:
            per_step = (at - self.pace_from[1]) / (step - self.pace_from[0])
            eta = str(timedelta(seconds=round(per_step * max(0, self.total - step))))
        fields: dict[str, Any] = {"completed": step, "eta": eta}
        if loss is not None:
            fields["loss"] = f"{loss:.4f}"
        self.progress.update(self.task, **fields)


def _watch(api: TuneforgeClient, job_id: str, *, as_json: bool) -> None:
    """Follow the job's event stream (from its first event) until the job has ended, reconnecting after the last
    seq seen when the stream drops; then exit as `jobs watch` says."""
    from app.jobs.state import TERMINAL_STATUSES  # here: the other client commands start without SQLAlchemy

    job = api.get(f"/jobs/{job_id}")  # a wrong id is a 404 before anything is drawn
    view = None if as_json else _WatchView(api, job)
    after, failing_since = 0, None

    def show(event: dict[str, Any]) -> None:
        nonlocal after, failing_since
        after, failing_since = event["seq"], None
        if view is None:
            typer.echo(json.dumps(event))
        else:
            view.show(event)

    with view or nullcontext():
        while True:
            try:
                for event in api.job_events(job_id, after=after):
                    show(event)
                job = api.get(f"/jobs/{job_id}")
                if job["status"] in TERMINAL_STATUSES:
                    # The stream may have dropped before the job's last events: they are all written by now.
                    for event in _events_after(api, job_id, after):
                        show(event)
                    break
            except (ApiUnreachable, ApiError) as exc:
                # Unreachable, or a proxy or the API answering while restarting: the job goes on, so does the watch.
                if isinstance(exc, ApiError) and exc.status_code not in RETRIED_STATUSES:
                    raise
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > RECONNECT_GIVE_UP_SECONDS:
                    raise
                console = view.progress.console if view is not None else Console(stderr=True)
                console.print(f"{exc.message}; reconnecting", style="yellow", highlight=False)
                time.sleep(RECONNECT_DELAY_SECONDS)
    if job["status"] == "succeeded":
        typer.echo(f"job {job_id} succeeded: adapter {job['adapter_id']}", err=True)
        if not as_json:  # JSON lines stay JSON: the last event names the adapter
            typer.echo(job["adapter_id"])
        return
    if job["status"] == "cancelled":
        fail(f"job {job_id} was cancelled")
    error = job["error"] or {"message": "no reason recorded", "code": "unknown"}
    fail(f"job {job_id} failed: {error['message']} ({error['code']})")


def _events_after(api: TuneforgeClient, job_id: str, after: int) -> Iterator[dict[str, Any]]:
    """The job's events after seq `after` that are written now, page by page."""
    while True:
        page = api.get(f"/jobs/{job_id}/events", {"after": after, "limit": 1000})
        yield from page["data"]
        if not page["has_more"] or not page["data"]:
            return
        after = page["data"][-1]["seq"]


# --- adapters ---------------------------------------------------------------------------------------------------
@adapters_cli.command("list")
def adapters_list(
    limit: Limit = 20,
    after: After = None,
    as_json: AsJson = False,
    api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """List your adapters, newest first."""
    with _api(api_url, api_key) as api:
        page = api.get("/adapters", {"limit": limit, "after": after})
    if as_json:
        print_json(page)
        return
    columns = ("id", "name", "model", "method", "format", "bytes", "created")
    table = _table(*columns, wrap=("name", "model"), caption=_more(page, "id"))
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
    _show(table)


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
    with _api(api_url, api_key) as api:
        size, sha256 = api.download(f"/adapters/{adapter_id}/download", destination)
    typer.echo(f"downloaded {size:,} bytes, sha256 {sha256} (checked)", err=True)
    typer.echo(str(destination))


# --- models and generation --------------------------------------------------------------------------------------
def print_models(models: list[dict[str, Any]]) -> None:
    """The base models as a table, then the adapters (`GET /v1/models` lists both) as another."""
    base = [m for m in models if "parent" not in m]
    adapters = [m for m in models if "parent" in m]
    caption = "params: parameters; max len: longest sequence in tokens"
    columns = ("id", "arch", "params", "max len", "chat", "source")
    table = _table(*columns, caption=caption, title="base models")
    for m in base:
        table.add_row(
            m["id"] + (" (default)" if m["default"] else ""),
            m["architecture"],
            _human(m["parameters"]),
            str(m["max_seq_length"]),
            "yes" if m["chat"] else "no",
            m["source"],
        )
    _show(table)
    if adapters:
        table = _table("id", "name", "base model", "method", "created", wrap=("name", "base model"), title="adapters")
        for m in adapters:
            table.add_row(m["id"], m["name"] or "", m["parent"], m["method"], format_time(m["created"]))
        _show(table)


def models_list(api_url: str, api_key: str | None, *, as_json: bool) -> None:
    """`models list` over the API: GET /v1/models."""
    with _api(api_url, api_key) as api:
        listed = api.get("/v1/models")
    if as_json:
        print_json(listed)
        return
    print_models(listed["data"])


def generate(
    prompt: Annotated[str, typer.Argument(metavar="PROMPT", help="The prompt; - reads it from stdin")],
    adapter: Annotated[
        str | None,
        typer.Option("--adapter", metavar="ID", help="An adapter (or job checkpoint) to apply; default: none"),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="The base model, without --adapter (default: the service's default)"),
    ] = None,
    chat: Annotated[
        bool,
        typer.Option("--chat", help="Send PROMPT as a user message through the model's chat template, not as raw text"),
    ] = False,
    max_tokens: Annotated[int, typer.Option(min=1, help="The most tokens to generate")] = 128,
    temperature: Annotated[
        float | None, typer.Option(min=0, max=2, help="0: greedy; higher is more random (default 1)")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="The same seed gives the same text")] = None,
    stop: Annotated[
        list[str] | None, typer.Option("--stop", help="A string that ends the text (repeat it, up to 4)")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the API's JSON answer once the text is complete (no streaming)")
    ] = False,
    api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """Generate text from a base model, or a base model plus one of your adapters, printed as it comes.

    The finish reason and the token counts go to stderr.
    """
    text = sys.stdin.read() if prompt == "-" else prompt
    body: dict[str, Any] = {"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}
    body["max_tokens"] = max_tokens
    optional = {"adapter_id": adapter, "base_model": model, "temperature": temperature, "seed": seed, "stop": stop}
    body.update({k: v for k, v in optional.items() if v is not None})
    with _api(api_url, api_key) as api:
        if as_json:
            print_json(api.post("/generate", body))
            return
        finish, usage = None, None
        for chunk in api.generate(body):
            sys.stdout.write(chunk["text"])
            sys.stdout.flush()
            finish = chunk.get("finish_reason") or finish
            usage = chunk.get("usage") or usage
    sys.stdout.write("\n")
    if usage is not None:
        typer.echo(
            f"[{finish}: {usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens]", err=True
        )
