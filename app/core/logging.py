"""One log format for every process (the API under uvicorn, the Celery worker, `tuneforge up`), with request and
job ids.

Each line is a JSON object: `time` (ISO 8601, UTC), `level`, `logger`, `message`, plus `request_id` on lines
logged while a request is handled, `job_id` on lines logged while the worker runs a job, and whatever a call adds
with `extra=` (the worker's `step`, `loss`, `outcome`…). `TUNEFORGE_LOG_FORMAT=text` prints the same lines for a
person at a terminal. Uvicorn and Celery log through the root handler installed here; neither installs its own.
"""

from __future__ import annotations

import logging
import math
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

from pythonjsonlogger.json import JsonFormatter

request_id_var: ContextVar[str | None] = ContextVar("tuneforge_request_id", default=None)
job_id_var: ContextVar[str | None] = ContextVar("tuneforge_job_id", default=None)

CONTEXT_FIELDS = {"request_id": request_id_var, "job_id": job_id_var}
# Loggers of the servers we run under: they hand their lines to the root handler instead of printing their own.
FRAMEWORK_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.app.trace", "celery.worker")
# uvicorn adds a copy of some messages with terminal colour codes: not for a log file.
NOT_LOGGED = ("color_message",)

LogFormat = Literal["json", "text"]

# What would end a line, or move a terminal's cursor, in the text format: C0 and C1 controls, DEL, and Unicode's line
# and paragraph separators. A request path is percent-decoded before it is logged: `/jobs/x%0Afake` holds a newline.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_controls(text: str) -> str:
    """`text` on one line: each control character written as its escape (`\\n`, `\\x1b`, `\\u2028`)."""
    return CONTROL_CHARACTERS.sub(lambda m: _ESCAPES.get(m[0]) or m[0].encode("unicode_escape").decode(), text)


# An incoming X-Request-ID is kept only if it looks like an id: bounded, no spaces, quotes or control characters.
SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def sane_request_id(value: str | None) -> str | None:
    return value if value is not None and SAFE_REQUEST_ID.fullmatch(value) else None


def _utc_time(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds")


class ContextFilter(logging.Filter):
    """Adds `request_id` and `job_id` to a record when they are set (by the request middleware, the worker)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in CONTEXT_FIELDS.items():
            value = var.get()
            if value is not None and not hasattr(record, name):
                setattr(record, name, value)
        return True


class JsonLineFormatter(JsonFormatter):
    def __init__(self) -> None:
        super().__init__(
            ["asctime", "levelname", "name", "message"],
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger", "exc_info": "exception"},
            reserved_attrs=[*logging.LogRecord("", 0, "", 0, "", None, None).__dict__, "message", *NOT_LOGGED],
            json_ensure_ascii=False,
        )

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 (logging's name)
        return _utc_time(record)

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        # A diverged step's NaN loss as null: bare NaN is not JSON, and strict readers would drop the line.
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in log_data.items()}


class TextFormatter(logging.Formatter):
    """`time level logger: message [request_id=… job_id=…]`: one line a record (and its traceback after it), whatever
    the message holds, so that no one can add a line of their own (a request path, a file name, a model's text)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return _utc_time(record)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        # record.message is set by format() for this call; the record itself is left as it came (other handlers).
        message = record.message
        record.message = escape_controls(message)
        try:
            return super().formatMessage(record)
        finally:
            record.message = message

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = " ".join(f"{name}={getattr(record, name)}" for name in CONTEXT_FIELDS if hasattr(record, name))
        if not ids:
            return line
        first, newline, rest = line.partition("\n")  # after the message, before a traceback
        return f"{first} [{ids}]{newline}{rest}"


def make_handler(fmt: LogFormat = "json", stream: TextIO | None = None) -> logging.Handler:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLineFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    return handler


def configure_logging(level: str = "INFO", fmt: LogFormat = "json", stream: TextIO | None = None) -> None:
    """The process's one log handler (on stderr unless `stream`), on the root logger; called once at startup."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(make_handler(fmt, stream))
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # Python's warnings too, as lines of the same format
    for name in FRAMEWORK_LOGGERS:
        framework = logging.getLogger(name)
        framework.handlers.clear()
        framework.propagate = True


@contextmanager
def job_logging_context(job_id: str) -> Iterator[None]:
    """Lines logged inside carry `job_id`."""
    token = job_id_var.set(job_id)
    try:
        yield
    finally:
        job_id_var.reset(token)
