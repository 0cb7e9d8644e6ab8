"""Line-by-line validation of JSONL training files: every bad line is reported, not only the first."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from app.ml.formatting import render_chat

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


def texts_to_tokenize(tokenizer: Any, record: dict[str, Any], fmt: str) -> tuple[list[str], int]:
    """The strings whose tokens make up the training example, and how many special tokens are added.

    Mirrors `app.ml.formatting.encode_record` without computing labels, so counting stays cheap.
    """
    if fmt == "chat":
        return [render_chat(tokenizer, record["messages"], add_generation_prompt=False)], 0
    if fmt == "prompt_completion":
        return [record["prompt"], record["completion"]], 1  # + end of sequence
    return [record["text"]], 1


class LineValidator:
    """Feed raw lines (bytes, without the newline) in order, then `finish()`; read `report`.

    Token counting is batched: the fast tokenizer encodes many examples at once, in parallel.
    """

    BATCH = 512

    def __init__(self, tokenizer: Any, max_errors: int) -> None:
        self.tokenizer = tokenizer
        self.max_errors = max_errors
        self.report = ValidationReport()
        self._pending: list[str] = []

    def _count_pending(self) -> None:
        if self._pending:
            encoded = self.tokenizer(self._pending, add_special_tokens=False)["input_ids"]
            self.report.n_tokens += sum(len(ids) for ids in encoded)
            self._pending = []

    def finish(self) -> ValidationReport:
        self._count_pending()
        return self.report

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
        except LineIssue as issue:
            self._error(line_no, issue.code, issue.message)
            return
        texts, n_special = texts_to_tokenize(self.tokenizer, record, fmt)
        self._pending.extend(texts)
        self.report.n_examples += 1
        self.report.n_tokens += n_special
        if len(self._pending) >= self.BATCH:
            self._count_pending()
