"""Line-by-line validation of JSONL training files: every bad line is reported, not only the first."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from jinja2.exceptions import TemplateError

from app.core.errors import ErrorCode, InvalidInput
from app.ml import preference
from app.ml.formatting import render_chat, render_chat_spans
from app.ml.jsonl import Line, LineIssue, parse_line
from app.ml.tool_calls import RESULT_ROLES, ToolLineChecker, chat_inputs, is_tool_record

FORMATS = ("chat", "prompt_completion", "text", "preference")
ROLES = ("system", "user", "assistant", *RESULT_ROLES)
MESSAGE_FIELDS = {"role", "content", "name", "weight"}
ROLE_FIELDS = {"assistant": {"tool_calls", "function_call"}, "tool": {"tool_call_id"}}
# Training encodes a conversation by rendering the chat template once per assistant turn over the turns before
# it (quadratic in the turns): the bound keeps that cost in proportion to the file (0.6 s at 256 messages).
MAX_MESSAGES = 256


@dataclass
class LineError:
    line: int
    code: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"line": self.line, "code": self.code, "message": self.message}


@dataclass
class ValidationReport:
    n_lines: int = 0
    n_examples: int = 0
    n_tokens: int = 0
    max_example_tokens: int = 0
    format: str | None = None
    has_tools: bool = False  # some line declares tools or holds tool calls or results
    # False: tool lines the counting model cannot render were counted roughly; a job's model counts them again.
    counted_exactly: bool = True
    errors: list[LineError] = field(default_factory=list)
    n_errors: int = 0

    def add_error(self, line: int, code: str, message: str, *, keep: int) -> None:
        """Count a bad line; its error is listed while fewer than `keep` are."""
        self.n_errors += 1
        if len(self.errors) < keep:
            self.errors.append(LineError(line, code, message))

    def as_dict(self) -> dict[str, Any]:
        return {
            "n_lines": self.n_lines,
            "n_examples": self.n_examples,
            "n_tokens": self.n_tokens,
            "max_example_tokens": self.max_example_tokens,
            "format": self.format,
            "n_errors": self.n_errors,
            "errors": [e.as_dict() for e in self.errors],
        }


def _unsupported(what: str) -> LineIssue:
    return LineIssue(ErrorCode.unsupported_feature, f"{what} are not supported yet; remove them from this line")


def detect_format(record: dict[str, Any]) -> str:
    if preference.is_preference(record):
        return "preference"
    if "messages" in record:
        return "chat"
    if "prompt" in record or "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    raise LineIssue(
        ErrorCode.unknown_format,
        'expected one of: {"messages": [...]}, {"prompt": ..., "completion": ...}, {"text": ...}, '
        '{"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}',
    )


def _require_string(record: dict[str, Any], key: str, where: str = "") -> str:
    if key not in record:
        raise LineIssue(ErrorCode.missing_field, f'{where}missing field "{key}"')
    value = record[key]
    if not isinstance(value, str):
        raise LineIssue(ErrorCode.invalid_type, f'{where}"{key}" must be a string, got {type(value).__name__}')
    return value


def check_record(record: dict[str, Any], fmt: str) -> None:
    """Raise LineIssue naming the first problem of one record in the given format."""
    if fmt == "preference":  # two conversations, each checked as a chat line, named as the line has them
        n_input = len(record.get("input", {}).get("messages", [])) if isinstance(record.get("input"), dict) else 0
        for output, chat in zip(preference.OUTPUTS, preference.conversations(record), strict=True):
            try:
                check_record(chat, "chat")
            except LineIssue as issue:
                raise LineIssue(issue.code, preference.where_in_line(issue.message, n_input, output)) from None
        return
    if fmt == "chat":
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise LineIssue(ErrorCode.invalid_type, '"messages" must be a non-empty list')
        if len(messages) > MAX_MESSAGES:
            raise LineIssue(
                ErrorCode.too_many_messages,
                f"the conversation has {len(messages)} messages; at most {MAX_MESSAGES} are allowed",
            )
        tools = ToolLineChecker(record)
        seen_user = False
        has_assistant = False
        for i, message in enumerate(messages):
            where = f"messages[{i}]: "
            if not isinstance(message, dict):
                raise LineIssue(ErrorCode.invalid_type, f"{where}must be an object with role and content")
            role = _require_string(message, "role", where)
            if isinstance(message.get("content"), list):
                raise LineIssue(
                    ErrorCode.unsupported_feature,
                    f"{where}content parts (images, audio, files) are not supported yet; give content as a string",
                )
            if role not in ROLES:
                raise LineIssue(ErrorCode.invalid_role, f'{where}role "{role[:40]}" is not one of {", ".join(ROLES)}')
            tools.before(i, role)
            if role in RESULT_ROLES:
                tools.result(i, role, message)
            if role == "assistant" and tools.calls(i, message):
                content = message.get("content")  # a message with calls may have no text
                if content is None:
                    content = ""
                elif not isinstance(content, str):
                    raise LineIssue(ErrorCode.invalid_type, f'{where}"content" must be a string or null')
            else:
                content = _require_string(message, "content", where)
            if role == "system" and i != 0:
                raise LineIssue(ErrorCode.invalid_role, f"{where}a system message may only come first")
            if role == "user":
                seen_user = True
            if role == "assistant":
                if not seen_user:
                    raise LineIssue(ErrorCode.invalid_order, f"{where}an assistant message must follow a user message")
                if not content.strip() and not ("tool_calls" in message or "function_call" in message):
                    raise LineIssue(ErrorCode.empty_content, f"{where}assistant content is empty")
                has_assistant = has_assistant or message.get("weight", 1) == 1
            extra = set(message) - MESSAGE_FIELDS - ROLE_FIELDS.get(role, set())
            if extra:
                names = ", ".join(sorted(name[:40] for name in extra)[:5])
                raise LineIssue(ErrorCode.unknown_field, f"{where}unknown field(s): {names}")
            if "name" in message:
                _require_string(message, "name", where)
            if "weight" in message and (type(message["weight"]) is not int or message["weight"] not in (0, 1)):
                raise LineIssue(ErrorCode.invalid_type, f'{where}"weight" must be 0 or 1')
        tools.finish()
        if not has_assistant:
            raise LineIssue(
                ErrorCode.no_assistant_message,
                'the conversation has no assistant message to learn from (every one has "weight": 0)',
            )
    elif fmt == "prompt_completion":
        _require_string(record, "prompt")
        completion = _require_string(record, "completion")
        if not completion.strip():
            raise LineIssue(ErrorCode.empty_content, '"completion" is empty')
    else:
        text = _require_string(record, "text")
        if not text.strip():
            raise LineIssue(ErrorCode.empty_content, '"text" is empty')


def texts_to_tokenize(tokenizer: Any, record: dict[str, Any], fmt: str) -> tuple[list[str], int]:
    """The strings whose tokens make up the training example, and how many special tokens are added.

    Mirrors `app.ml.formatting.encode_record` without computing labels, so counting stays cheap. A preference
    line gives its two conversations, each a sequence of its own.
    """
    if fmt == "preference":
        return [texts_to_tokenize(tokenizer, chat, "chat")[0][0] for chat in preference.conversations(record)], 0
    if fmt == "chat":
        messages, tools = chat_inputs(record)
        if tools is not None:  # located turn by turn, as training will: a template that cannot is a line error now
            return [render_chat_spans(tokenizer, messages, tools)[0]], 0
        return [render_chat(tokenizer, messages, add_generation_prompt=False)], 0
    if fmt == "prompt_completion":
        return [record["prompt"], record["completion"]], 1  # + end of sequence
    return [record["text"]], 1


class LineValidator:
    """Feed lines (from `app.ml.jsonl.split_lines`) in order, then `finish()`; read `report`.

    Token counting is batched: the fast tokenizer encodes many examples at once, in parallel.
    """

    BATCH = 512  # texts per tokenizer call...
    BATCH_CHARS = 1_000_000  # ...or fewer, so that a file of long lines never holds more than this in flight

    def __init__(
        self,
        tokenizer: Any,
        max_errors: int,
        *,
        model_id: str,
        tool_call_format: str | None = None,
        tools_counted_later: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.model_id = model_id  # whose tokenizer counts: named in messages
        self.tool_call_format = tool_call_format  # the model's (None: its chat template has no tool support)
        # The model was not chosen (the service's default counts): tool lines it cannot render are accepted, counted
        # roughly (their JSON), and counted exactly with the job's model when a job is created on the file.
        self.tools_counted_later = tools_counted_later
        self.max_errors = max_errors
        self.report = ValidationReport()
        self._texts: list[str] = []
        self._chars = 0
        # Per pending example: (number of texts, special tokens, whether each text is a sequence of its own: the two
        # conversations of a preference line, whose longer one must fit max_seq_length).
        self._examples: list[tuple[int, int, bool]] = []

    def _count_pending(self) -> None:
        if not self._texts:
            return
        encoded = iter(self.tokenizer(self._texts, add_special_tokens=False)["input_ids"])
        for n_texts, n_special, separate in self._examples:
            lengths = [len(next(encoded)) for _ in range(n_texts)]
            sequences = [n_special + n for n in lengths] if separate else [n_special + sum(lengths)]
            self.report.n_tokens += sum(sequences)
            self.report.max_example_tokens = max(self.report.max_example_tokens, *sequences)
        self._texts, self._examples, self._chars = [], [], 0

    def finish(self) -> ValidationReport:
        self._count_pending()
        return self.report

    def _error(self, line_no: int, code: str, message: str) -> None:
        self.report.add_error(line_no, code, message, keep=self.max_errors)

    def feed(self, line: Line) -> None:
        self.report.n_lines = line.number
        try:
            record = parse_line(line)
            if record is None:
                return  # blank lines (a trailing newline, say) are allowed and skipped
            fmt = detect_format(record)
            if self.report.format is None:
                self.report.format = fmt
            elif fmt != self.report.format:
                raise LineIssue(
                    ErrorCode.mixed_formats, f"line is in {fmt} format but the file is in {self.report.format} format"
                )
            check_record(record, fmt)
            if fmt in ("chat", "preference") and self.tokenizer.chat_template is None:
                raise InvalidInput(
                    f"the file holds conversations but {self.model_id} has no chat template to render them: upload "
                    "it with `base_model` set to a chat model (GET /v1/models lists them), or use prompt/completion "
                    "lines",
                    param="base_model",
                    code=ErrorCode.no_chat_template,
                )
            if fmt == "chat" and is_tool_record(record):
                if self.tool_call_format is None and self.tools_counted_later:
                    self.report.has_tools = True
                    self.report.counted_exactly = False
                    self._pending([json.dumps(record, ensure_ascii=False)], 0)
                    return
                if self.tool_call_format is None:
                    raise LineIssue(
                        ErrorCode.no_tool_support,
                        f"the line uses tool calling but the chat template of {self.model_id} has no tool support: "
                        "upload the file with `base_model` set to a model whose `tool_call_format` is not null "
                        "(GET /v1/models/{id} shows it)",
                    )
                self.report.has_tools = True
        except LineIssue as issue:
            self._error(line.number, issue.code, issue.message)
            return
        try:
            texts, n_special = texts_to_tokenize(self.tokenizer, record, fmt)
        except Exception as exc:  # a chat template may refuse a conversation (raise_exception in Jinja)
            # The template's own words when it refuses (e.g. "only supports single tool-calls at once"); a
            # failure of the template itself says nothing a user can act on.
            said = f": {str(exc)[:200]}" if type(exc) is TemplateError else ""
            self._error(
                line.number,
                ErrorCode.template_error,
                f"the chat template of {self.model_id} cannot render this conversation{said}",
            )
            return
        self._pending(texts, n_special, separate=fmt == "preference")

    def _pending(self, texts: list[str], n_special: int, *, separate: bool = False) -> None:
        self._texts.extend(texts)
        self._chars += sum(len(text) for text in texts)
        self._examples.append((len(texts), n_special, separate))
        self.report.n_examples += 1
        if len(self._texts) >= self.BATCH or self._chars >= self.BATCH_CHARS:
            self._count_pending()


class EvalItemsValidator:
    """A file of eval items (purpose `evals`, OpenAI's shape): each line `{"item": {...}}`, optionally with the
    answer to grade as `"sample": {...}`. Nothing is tokenized: an eval run checks each item against its eval's
    schema when the run is created."""

    def __init__(self, max_errors: int) -> None:
        self.max_errors = max_errors
        self.report = ValidationReport(format="eval_items")

    def feed(self, line: Line) -> None:
        self.report.n_lines = line.number
        try:
            record = parse_line(line)
            if record is None:
                return
            unknown = sorted(set(record) - {"item", "sample"})
            if unknown:
                raise LineIssue(
                    ErrorCode.invalid_value,
                    f"unknown field {unknown[0][:64]!r}: a line holds `item` and, optionally, `sample`",
                )
            if not isinstance(record.get("item"), dict):
                raise LineIssue(ErrorCode.missing_field, "the line needs `item`, a JSON object")
            if "sample" in record and not isinstance(record["sample"], dict):
                raise LineIssue(ErrorCode.invalid_type, "`sample` must be a JSON object")
        except LineIssue as issue:
            self.report.add_error(line.number, issue.code, issue.message, keep=self.max_errors)
            return
        self.report.n_examples += 1

    def finish(self) -> ValidationReport:
        return self.report
