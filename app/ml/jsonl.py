"""The one JSONL reader: upload validation and the training worker split and parse lines with this code.

A line ends at `\\n` (a `\\r` before it is dropped) and nowhere else: U+2028, U+0085 and the like are
ordinary characters inside JSON strings. Each line is bounded in size and nesting depth, so what the
validator accepts, the worker reads the same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from app.core.error_codes import ErrorCode

MAX_LINE_BYTES = 1024 * 1024
MAX_DEPTH = 32
_BOM = b"\xef\xbb\xbf"


class LineIssue(Exception):
    """What is wrong with one line: a stable `code` and a message for the user."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Line:
    number: int  # 1-based
    data: bytes | None  # None: the line was longer than MAX_LINE_BYTES (its bytes are not kept)


def split_lines(chunks: Iterable[bytes], *, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[Line]:
    """Lines of a byte stream, numbered; memory stays within one line of at most `max_line_bytes`."""
    number = 0
    pending = bytearray()
    overlong = False
    for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) != -1:
            number += 1
            if overlong or len(pending) + end - start > max_line_bytes:
                yield Line(number, None)
            else:
                pending += chunk[start:end]
                yield Line(number, _clean(number, bytes(pending)))
            pending.clear()
            overlong = False
            start = end + 1
        if not overlong:
            pending += chunk[start:]
            if len(pending) > max_line_bytes:
                overlong = True
                pending.clear()
    if pending or overlong:
        number += 1
        yield Line(number, None if overlong else _clean(number, bytes(pending)))


def _clean(number: int, data: bytes) -> bytes:
    data = data.removesuffix(b"\r")
    return data.removeprefix(_BOM) if number == 1 else data


def _reject_constant(name: str) -> Any:
    raise LineIssue(ErrorCode.invalid_json, f"not valid JSON: {name} is not a JSON value")


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth > MAX_DEPTH:
                break
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_line(line: Line) -> dict[str, Any] | None:
    """The JSON object on a line; None for a blank line; LineIssue for anything else."""
    if line.data is None:
        raise LineIssue(ErrorCode.line_too_long, f"the line is longer than {MAX_LINE_BYTES} bytes")
    try:
        text = line.data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LineIssue(ErrorCode.invalid_utf8, f"not valid UTF-8 at byte {exc.start + 1} of the line") from None
    if not text.strip():
        return None
    try:
        record = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise LineIssue(ErrorCode.invalid_json, f"not valid JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise LineIssue(ErrorCode.too_deep, f"the JSON is nested more than {MAX_DEPTH} levels deep") from None
    except ValueError:  # Python's bound on the digits of an integer
        raise LineIssue(ErrorCode.invalid_json, "not valid JSON: a number has too many digits") from None
    if not isinstance(record, dict):
        raise LineIssue(ErrorCode.invalid_type, f"each line must be a JSON object, got {type(record).__name__}")
    if _depth(record) > MAX_DEPTH:
        raise LineIssue(ErrorCode.too_deep, f"the JSON is nested more than {MAX_DEPTH} levels deep")
    if "\\u" in text and _has_lone_surrogate(record):
        raise LineIssue(ErrorCode.invalid_unicode, "a string holds an unpaired surrogate escape (\\ud800-\\udfff)")
    return record


def _has_lone_surrogate(record: dict[str, Any]) -> bool:
    """JSON can escape half of a UTF-16 pair (`"\\ud800"`); such text cannot be encoded or tokenized."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def read_records(chunks: Iterable[bytes]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for every non-blank line; the first bad line raises LineIssue."""
    for line in split_lines(chunks):
        record = parse_line(line)
        if record is not None:
            yield line.number, record
