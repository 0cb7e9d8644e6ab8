"""`tuneforge webhooks`: register a URL to receive your jobs' events, list them, see their deliveries, remove one."""

from __future__ import annotations

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

# Kept here, not imported from the server (client commands start without its imports); the API refuses others.
EVENTS = ("fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled")

webhooks_cli = typer.Typer(
    help="Webhook endpoints: URLs that receive your jobs' events, signed (Standard Webhooks, as OpenAI's).",
    no_args_is_help=True,
)


@webhooks_cli.command("add")
def webhooks_add(
    url: Annotated[str, typer.Argument(metavar="URL", help="An http(s) URL that receives the events (POST, JSON)")],
    events: Annotated[
        list[str] | None,
        typer.Option("--event", metavar="EVENT", help=f"An event to send it (repeat for several): {', '.join(EVENTS)}"),
    ] = None,
    name: Annotated[str | None, typer.Option(help="A name for people to read")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON (with the secret)")] = False,
    api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """Register URL for every event (or those given with --event) and print its id.

    Its signing secret (whsec_…) goes to stderr: it is shown this once. Verify each delivery with it, e.g. with
    the official `openai` client's `client.webhooks.unwrap(body, headers, secret=...)`.
    """
    body: dict[str, object] = {"url": url}
    if events:
        body["events"] = events
    if name is not None:
        body["name"] = name
    with connect(api_url, api_key) as api:
        created = api.post("/v1/webhook_endpoints", body)
    if as_json:
        print_json(created)
        return
    typer.echo(f"signing secret (shown once): {created['secret']}", err=True)
    typer.echo(f"events: {', '.join(created['events'])}", err=True)
    typer.echo(created["id"])


@webhooks_cli.command("list")
def webhooks_list(
    limit: Limit = 20,
    after: After = None,
    as_json: AsJson = False,
    api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """List your webhook endpoints, newest first (their secrets are not shown)."""
    page = fetch_page(api_url, api_key, "/v1/webhook_endpoints", limit=limit, after=after, as_json=as_json)
    if page is None:
        return
    columns = ("id", "url", "events", "secret", "created")
    table = new_table(*columns, wrap=("url", "events"), caption=page_caption(page, "id"))
    for endpoint in page["data"]:
        table.add_row(
            endpoint["id"],
            endpoint["url"],
            " ".join(endpoint["events"]),
            endpoint["signing_secret_hint"],
            format_time(endpoint["created_at"]),
        )
    show_table(table)


@webhooks_cli.command("deliveries")
def webhooks_deliveries(
    endpoint_id: Annotated[str, typer.Argument(metavar="ID", help="A webhook endpoint's id")],
    limit: Limit = 20,
    after: After = None,
    as_json: AsJson = False,
    api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """The events sent (or being sent) to an endpoint, newest first, with their attempts."""
    path = f"/v1/webhook_endpoints/{endpoint_id}/deliveries"
    page = fetch_page(api_url, api_key, path, limit=limit, after=after, as_json=as_json)
    if page is None:
        return
    columns = ("id", "event", "job", "status", "attempts", "last answer", "next attempt", "created")
    table = new_table(*columns, wrap=("last answer",), caption=page_caption(page, "id"))
    for delivery in page["data"]:
        answer = delivery["last_error"] or (
            f"HTTP {delivery['last_status_code']}" if delivery["last_status_code"] else ""
        )
        table.add_row(
            delivery["id"],
            delivery["event_type"],
            delivery["event"]["data"]["id"],
            delivery["status"],
            str(delivery["attempts"]),
            answer,
            format_time(delivery["next_attempt_at"]),
            format_time(delivery["created_at"]),
        )
    show_table(table)


@webhooks_cli.command("remove")
def webhooks_remove(
    endpoint_id: Annotated[str, typer.Argument(metavar="ID", help="A webhook endpoint's id")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON")] = False,
    api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
) -> None:
    """Remove a webhook endpoint: nothing more is sent to it (deliveries not yet made are dropped)."""
    with connect(api_url, api_key) as api:
        deleted = api.delete(f"/v1/webhook_endpoints/{endpoint_id}")
    if as_json:
        print_json(deleted)
        return
    typer.echo(f"webhook endpoint {deleted['id']}: removed")
