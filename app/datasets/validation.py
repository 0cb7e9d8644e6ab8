"""Line-by-line validation of JSONL training files: every bad line is reported, not only the first."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from app.ml.formatting import encode_record

FORMATS = ("chat", "prompt_completion", "text")
ROLES = ("system", "user", "assistant")


@dataclass
class LineError:
    line: int
    code: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"line": self.line, "code": self.code, "message": self.message}


class LineIssue(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class ValidationReport:
    n_lines: int = 0
    n_examples: int = 0
    n_tokens: int = 0
    format: str | None = None
    errors: list[LineError] = field(default_factory=list)
    n_errors: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "n_lines": self.n_lines,
            "n_examples": self.n_examples,
            "n_tokens": self.n_tokens,
            "format": self.format,
            "n_errors": self.n_errors,
            "errors": [e.as_dict() for e in self.errors],
        }


def detect_format(record: dict[str, Any]) -> str:
    if "messages" in record:
        return "chat"
    if "prompt" in record or "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    raise LineIssue(
        "unknown_format",
        'expected one of: {"messages": [...]}, {"prompt": ..., "completion": ...}, {"text": ...}',
    )


def _require_string(record: dict[str, Any], key: str, where: str = "") -> str:
    if key not in record:
        raise LineIssue("missing_field", f'{where}missing field "{key}"')
    value = record[key]
    if not isinstance(value, str):
        raise LineIssue("invalid_type", f'{where}"{key}" must be a string, got {type(value).__name__}')
    return value


def check_record(record: dict[str, Any], fmt: str) -> None:
    """Raise LineIssue naming the first problem of one record in the given format."""
    if fmt == "chat":
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise LineIssue("invalid_type", '"messages" must be a non-empty list')
        seen_user = False
        has_assistant = False
        for i, message in enumerate(messages):
            where = f"messages[{i}]: "
            if not isinstance(message, dict):
                raise LineIssue("invalid_type", f"{where}must be an object with role and content")
            role = _require_string(message, "role", where)
            if role not in ROLES:
                raise LineIssue("invalid_role", f'{where}role "{role}" is not one of {", ".join(ROLES)}')
            content = _require_string(message, "content", where)
            if role == "system" and i != 0:
                raise LineIssue("invalid_role", f"{where}a system message may only come first")
            if role == "user":
                seen_user = True
            if role == "assistant":
                if not seen_user:
                    raise LineIssue("invalid_order", f"{where}an assistant message must follow a user message")
                if not content.strip():
                    raise LineIssue("empty_content", f"{where}assistant content is empty")
                has_assistant = True
            extra = set(message) - {"role", "content", "name", "weight"}
            if extra:
                raise LineIssue("unknown_field", f"{where}unknown field(s): {', '.join(sorted(extra))}")
        if not has_assistant:
            raise LineIssue("no_assistant_message", "the conversation has no assistant message to learn from")
    elif fmt == "prompt_completion":
        _require_string(record, "prompt")
        completion = _require_string(record, "completion")
        if not completion.strip():
            raise LineIssue("empty_content", '"completion" is empty')
    else:
        text = _require_string(record, "text")
        if not text.strip():
            raise LineIssue("empty_content", '"text" is empty')


class LineValidator:
    """Feed raw lines (bytes, without the newline) in order; read `report` at the end."""

    def __init__(self, tokenizer: Any, max_errors: int) -> None:
        self.tokenizer = tokenizer
        self.max_errors = max_errors
        self.report = ValidationReport()

    def _error(self, line_no: int, code: str, message: str) -> None:
        self.report.n_errors += 1
        if len(self.report.errors) < self.max_errors:
            self.report.errors.append(LineError(line_no, code, message))

    def feed(self, line_no: int, raw: bytes) -> None:
        self.report.n_lines = line_no
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self._error(line_no, "invalid_utf8", f"not valid UTF-8 at byte {exc.start + 1} of the line")
            return
        if not text.strip():
            return  # blank lines (a trailing newline, say) are allowed and skipped
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            self._error(line_no, "invalid_json", f"not valid JSON: {exc.msg} at column {exc.colno}")
            return
        try:
            if not isinstance(record, dict):
                raise LineIssue("invalid_type", f"each line must be a JSON object, got {type(record).__name__}")
            fmt = detect_format(record)
            if self.report.format is None:
                self.report.format = fmt
            elif fmt != self.report.format:
                raise LineIssue(
                    "mixed_formats", f"line is in {fmt} format but the file is in {self.report.format} format"
                )
            check_record(record, fmt)
            encoded = encode_record(self.tokenizer, record)
        except LineIssue as issue:
            self._error(line_no, issue.code, issue.message)
            return
        except ValueError as exc:
            self._error(line_no, "unsupported_conversation", str(exc))
            return
        self.report.n_examples += 1
        self.report.n_tokens += len(encoded.input_ids)
