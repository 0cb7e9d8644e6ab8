"""`tuneforge generate`, and the models it can use as the API lists them (`models list`, without --local)."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from app.cli.api import ApiKey, ApiUrl, connect, new_table, show_table
from app.cli.client import DEFAULT_API_URL
from app.cli.output import format_time, print_json


def _human(n: int) -> str:
    """134515008 -> 134.5M: short enough for a table in 80 columns."""
    for limit, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= limit:
            return f"{n / limit:.1f}{suffix}"
    return str(n)


def print_models(models: list[dict[str, Any]]) -> None:
    """The base models as a table, then the adapters (`GET /v1/models` lists both) as another."""
    base = [m for m in models if "parent" not in m]
    adapters = [m for m in models if "parent" in m]
    caption = "params: parameters; max len: longest sequence in tokens; tools: how it writes tool calls"
    columns = ("id", "arch", "params", "max len", "chat", "tools", "source")
    table = new_table(*columns, caption=caption, title="base models")
    for m in base:
        table.add_row(
            m["id"] + (" (default)" if m["default"] else ""),
            m["architecture"],
            _human(m["parameters"]),
            str(m["max_seq_length"]),
            "yes" if m["chat"] else "no",
            m.get("tool_call_format") or "no",
            m["source"],
        )
    show_table(table)
    if adapters:
        table = new_table(
            "id", "name", "base model", "method", "created", wrap=("name", "base model"), title="adapters"
        )
        for m in adapters:
            table.add_row(m["id"], m["name"] or "", m["parent"], m["method"], format_time(m["created"]))
        show_table(table)


def models_list(api_url: str, api_key: str | None, *, as_json: bool) -> None:
    """`models list` over the API: GET /v1/models."""
    with connect(api_url, api_key) as api:
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
    with connect(api_url, api_key) as api:
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
