"""`tuneforge jobs`: create a fine-tuning job, list, get, its events, pause, resume, cancel, delete, and `watch` with
its live view.

`jobs watch` alone reads the job states from app.jobs.state (when it starts following a job, for minutes): the
other commands start without the server's imports.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import nullcontext
from datetime import timedelta
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

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
from app.cli.client import DEFAULT_API_URL, ApiError, ApiUnreachable, TuneforgeClient
from app.cli.output import fail, format_time, print_json

RECONNECT_DELAY_SECONDS = 1.0
RETRIED_STATUSES = (502, 503, 504)  # a proxy or the API restarting: `jobs watch` tries again
RECONNECT_GIVE_UP_SECONDS = 60.0  # of failed reconnections in a row

jobs_cli = typer.Typer(
    help="Fine-tuning jobs: create, list, get, watch, events, pause, resume, cancel, delete.", no_args_is_help=True
)


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
        str | None,
        typer.Option(
            "--model",
            help="The base model to fine-tune (default: the service's default), or one of your adapters or "
            "checkpoints to continue from",
        ),
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            help="The fine-tuning method, e.g. lora, qlora, full (default: lora; --model an adapter: its method)"
        ),
    ] = None,
    objective: Annotated[
        str | None,
        typer.Option(help="sft (default: supervised) or dpo (preference pairs; hyperparameter beta)"),
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
    devices: Annotated[
        int | None,
        typer.Option("--devices", min=1, help="Devices to train on, one rank each (resources.devices; default 1)"),
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
    if devices is not None:
        body["resources"] = {"devices": devices}
    optional = {
        "base_model": model,
        "method": method,
        "objective": objective,
        "validation_file": validation_file,
        "suffix": suffix,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if dry_run:
        body["dry_run"] = True
    with connect(api_url, api_key) as api:
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
        ("trainable parameters", f"{plan['trainable_parameters']:,}"),
        ("storage reserved", f"{plan['estimated_stored_bytes']:,} bytes (checkpoints and adapter, until it ends)"),
        ("duration", str(timedelta(seconds=duration)) if duration is not None else "unknown"),
        ("estimated from", plan["estimate_basis"]),
        ("hyperparameters", json.dumps(plan["hyperparameters"])),
    ]
    table = new_table("dry run", "", wrap=("",), caption="nothing was created")
    for row in rows:
        table.add_row(*row)
    show_table(table)


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
    page = fetch_page(api_url, api_key, "/jobs", limit=limit, after=after, as_json=as_json)
    if page is None:
        return
    columns = ("id", "status", "model", "method", "step", "adapter", "created")
    table = new_table(*columns, wrap=("model",), caption=page_caption(page, "id"))
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
    show_table(table)


JobId = Annotated[str, typer.Argument(metavar="JOB_ID", help="A job's id (ftjob-…)")]


@jobs_cli.command("get")
def jobs_get(job_id: JobId, as_json: AsJson = False, api_url: ApiUrl = DEFAULT_API_URL, api_key: ApiKey = None) -> None:
    """Show a job: status, progress, latest metrics, adapter or error."""
    with connect(api_url, api_key) as api:
        job = api.get(f"/jobs/{job_id}")
    if as_json:
        print_json(job)
        return
    metrics = job["metrics"]
    rows = [
        ("id", job["id"]),
        ("status", job["status"] + (f" (attempt {job['attempt']})" if job["attempt"] > 1 else "")),
        ("model", job["base_model"]),
        ("method", job["method"] + (f", {job['objective']}" if job.get("objective", "sft") != "sft" else "")),
        ("step", _progress_text(job) or str(job["progress"]["step"])),
        ("epoch", str(job["progress"]["epoch"])),
        ("train loss", str(metrics.get("train_loss", ""))),
        ("valid loss", str(metrics.get("valid_loss", ""))),
        ("device", " ".join(x for x in (job["device"], job["dtype"]) if x)),
        ("devices", str(job["resources"]["devices"])),
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
    table = new_table("job", "", wrap=("",))
    for row in rows:
        if row[1]:
            table.add_row(*row)
    show_table(table)


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
    page = fetch_page(api_url, api_key, f"/jobs/{job_id}/events", limit=limit, after=after, as_json=as_json)
    if page is None:
        return
    table = new_table("seq", "time", "type", "message", wrap=("message",), caption=page_caption(page, "seq"))
    for event in page["data"]:
        style = "red" if event["level"] == "error" else None
        table.add_row(str(event["seq"]), format_time(event["created_at"]), event["type"], event["message"], style=style)
    show_table(table)


JobAsJson = Annotated[bool, typer.Option("--json", help="Print the API's JSON (the job)")]


def _act_on_job(job_id: str, action: str, as_json: bool, api_url: str, api_key: str | None) -> dict[str, Any] | None:
    """POST /jobs/{id}/<action>; the job as the API answered, or None once printed as JSON."""
    with connect(api_url, api_key) as api:
        job = api.post(f"/jobs/{job_id}/{action}")
    if as_json:
        print_json(job)
        return None
    return job  # type: ignore[no-any-return]


@jobs_cli.command("cancel")
def jobs_cancel(
    job_id: JobId, as_json: JobAsJson = False, api_url: ApiUrl = DEFAULT_API_URL, api_key: ApiKey = None
) -> None:
    """Cancel a job: a queued one never starts, a running one stops within a step and publishes nothing.

    Exit code 1 if it has already ended.
    """
    if (job := _act_on_job(job_id, "cancel", as_json, api_url, api_key)) is not None:
        typer.echo(f"job {job['id']}: {job['status']}")


@jobs_cli.command("pause")
def jobs_pause(
    job_id: JobId, as_json: JobAsJson = False, api_url: ApiUrl = DEFAULT_API_URL, api_key: ApiKey = None
) -> None:
    """Pause a job: a queued one at once, a running one once its current step is checkpointed (it says running
    until then). `jobs resume` continues it from there.

    Exit code 1 if it has ended.
    """
    if (job := _act_on_job(job_id, "pause", as_json, api_url, api_key)) is not None:
        pausing = " (pauses after its current step)" if job["status"] == "running" else ""
        typer.echo(f"job {job['id']}: {job['status']}{pausing}")


@jobs_cli.command("resume")
def jobs_resume(
    job_id: JobId, as_json: JobAsJson = False, api_url: ApiUrl = DEFAULT_API_URL, api_key: ApiKey = None
) -> None:
    """Resume a paused job: queued again, it continues from the checkpoint it paused at.

    Exit code 1 if it is not paused.
    """
    if (job := _act_on_job(job_id, "resume", as_json, api_url, api_key)) is not None:
        typer.echo(f"job {job['id']}: {job['status']}")


@jobs_cli.command("delete")
def jobs_delete(
    job_id: JobId,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON")] = False,
    api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """Delete a job that has ended, with its events, checkpoints and adapter (their stored files too); its
    training files stay.

    Exit code 1 if it has not ended (cancel it first).
    """
    with connect(api_url, api_key) as api:
        deleted = api.delete(f"/jobs/{job_id}")
    if as_json:
        print_json(deleted)
        return
    typer.echo(f"job {deleted['id']}: deleted")


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
    with connect(api_url, api_key) as api:
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
    from app.core.models import TERMINAL_STATUSES  # here: the other client commands start without SQLAlchemy

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
