"""Terminal output that several `tuneforge` commands share: an error line and its exit code, JSON, times, the log.

Kept free of the server's imports, as the client commands that use it are.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, NoReturn

import typer


def fail(message: str, code: int = 1) -> NoReturn:
    """End the command: `error: MESSAGE` on stderr, exit code `code` (1; 2 for a usage error)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2))


def format_time(moment: datetime | float | None, default: str = "") -> str:
    """A time as the tables show it, to the minute (their captions say: in UTC), from the database (a datetime) or
    from the API (Unix seconds); `default` when there is none."""
    if not moment:
        return default
    if not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(moment, UTC)
    return f"{moment:%Y-%m-%d %H:%M}"


def log_to_stderr() -> None:
    """The one log format (TUNEFORGE_LOG_FORMAT) on stderr; uvicorn's and Celery's loggers write through it too."""
    from app.core.logging import configure_logging
    from app.core.settings import get_settings

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
