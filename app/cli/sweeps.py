"""`tuneforge sweep`: train several configurations of one training file as jobs and rank them (create, list, get,
cancel), with the ranked table."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from app.cli.api import After, ApiKey, ApiUrl, AsJson, Limit, connect, fetch_page, new_table, page_caption, show_table
from app.cli.client import DEFAULT_API_URL
from app.cli.output import fail, format_time, print_json

sweeps_cli = typer.Typer(
    help="Sweeps: which method and settings are best for your data, each configuration trained as a job and ranked.",
    no_args_is_help=True,
)
WATCH_POLL_SECONDS = 2.0


def _config(value: str) -> dict[str, Any]:
    """METHOD or METHOD:JSON (its hyperparameters)."""
    method, _, hyperparameters = value.partition(":")
    config: dict[str, Any] = {"method": method.strip()}
    if hyperparameters:
        try:
            config["hyperparameters"] = json.loads(hyperparameters)
        except ValueError as exc:
            raise typer.BadParameter(
                f"{value!r}: the hyperparameters are not JSON ({exc})", param_hint="--config"
            ) from None
    return config


@sweeps_cli.command("create")
def sweeps_create(
    training_file: Annotated[str, typer.Argument(metavar="FILE_ID", help="An uploaded training file's id")],
    configs: Annotated[
        list[str] | None,
        typer.Option(
            "--config",
            "-c",
            metavar="METHOD[:JSON]",
            help="A configuration: a method and, after a colon, its hyperparameters as JSON (repeat for several), "
            "e.g. -c lora:'{\"learning_rate\": 0.0003}' -c ia3",
        ),
    ] = None,
    spec: Annotated[
        Path | None,
        typer.Option("--spec", metavar="JSON_FILE", help="The whole request body of POST /sweeps, from a file"),
    ] = None,
    validation_file: Annotated[
        str | None, typer.Option(help="A validation file's id (or set validation_split)")
    ] = None,
    base_model: Annotated[str | None, typer.Option(help="The base model (default: the service's)")] = None,
    max_parallel: Annotated[int, typer.Option(help="Jobs of the sweep at once")] = 1,
    no_elimination: Annotated[
        bool, typer.Option("--no-elimination", help="Train every configuration to its end (no successive halving)")
    ] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Wait for the sweep to end, then print its table")] = False,
    as_json: AsJson = False,
    api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """Create a sweep of the configurations given with --config (or a whole body with --spec) and print its id."""
    if spec is not None:
        body: dict[str, Any] = json.loads(spec.read_text())
        body.setdefault("training_file", training_file)
    else:
        if not configs:
            raise typer.BadParameter("give at least one --config (or --spec)", param_hint="--config")
        body = {"training_file": training_file, "configurations": [_config(c) for c in configs]}
        body["budget"] = {"max_parallel": max_parallel}
        if validation_file:
            body["validation_file"] = validation_file
        if base_model:
            body["base_model"] = base_model
        if no_elimination:
            body["early_elimination"] = {"rule": "none"}
    with connect(api_url, api_key) as api:
        sweep = api.post("/sweeps", body)
        while watch and sweep["status"] == "running":
            time.sleep(WATCH_POLL_SECONDS)
            sweep = api.get(f"/sweeps/{sweep['id']}")
    if as_json:
        print_json(sweep)
    elif watch:
        _show(sweep)
    else:
        typer.echo(sweep["id"])


@sweeps_cli.command("list")
def sweeps_list(
    limit: Limit = 20,
    after: After = None,
    as_json: AsJson = False,
    api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """List your sweeps, newest first."""
    page = fetch_page(api_url, api_key, "/sweeps", limit=limit, after=after, as_json=as_json)
    if page is None:
        return
    table = new_table("id", "name", "status", "configurations", "winner", "created", caption=page_caption(page, "id"))
    for sweep in page["data"]:
        winner = sweep["winner"]
        table.add_row(
            sweep["id"],
            sweep["name"],
            sweep["status"],
            str(len(sweep["results"])),
            f"{winner['method']} ({winner['objective']:.4f})" if winner else "",
            format_time(sweep["created_at"]),
        )
    show_table(table)


@sweeps_cli.command("get")
def sweeps_get(
    sweep_id: Annotated[str, typer.Argument(metavar="ID", help="A sweep's id")],
    as_json: AsJson = False,
    api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """The sweep's ranked table: objective, stopped early, steps, trainable parameters, peak memory, tokens/s."""
    with connect(api_url, api_key) as api:
        sweep = api.get(f"/sweeps/{sweep_id}")
    if as_json:
        print_json(sweep)
    else:
        _show(sweep)


@sweeps_cli.command("cancel")
def sweeps_cancel(
    sweep_id: Annotated[str, typer.Argument(metavar="ID", help="A sweep's id")],
    api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """Start no more configurations and cancel the running ones' jobs."""
    with connect(api_url, api_key) as api:
        sweep = api.post(f"/sweeps/{sweep_id}/cancel")
    typer.echo(f"{sweep['id']} {sweep['status']}")


def _show(sweep: dict[str, Any]) -> None:
    if not sweep["results"]:
        fail("the sweep has no configurations")
    savings = sweep["savings"]
    caption = (
        f"{sweep['status']}; steps trained {savings['steps_trained']:,} of {savings['steps_without_elimination']:,} "
        f"without elimination (saved {savings['saved_fraction']:.0%}); rungs at steps {sweep['rungs']}"
    )
    table = new_table(
        "rank",
        "method",
        "hyperparameters",
        "objective",
        "status",
        "stopped at",
        "steps",
        "trainable",
        "peak MiB",
        "tok/s",
        "wall s",
        "adapter",
        wrap=("hyperparameters",),
        caption=caption,
        title=sweep["id"],
    )
    for r in sweep["results"]:
        table.add_row(
            str(r["rank"] or "-"),
            r["method"],
            json.dumps(r["hyperparameters"]),
            f"{r['objective']:.4f}" if r["objective"] is not None else "-",
            r["status"],
            str(r["stopped_at_step"] or ""),
            f"{r['steps']}/{r['planned_steps']}",
            f"{r['trainable_parameters']:,}",
            f"{r['peak_memory_bytes'] / 2**20:,.0f}" if r["peak_memory_bytes"] else "-",
            f"{r['tokens_per_second']:,.0f}" if r["tokens_per_second"] else "-",
            f"{r['wall_seconds']:.1f}" if r["wall_seconds"] is not None else "-",
            r["adapter_id"] or "",
        )
    show_table(table)
