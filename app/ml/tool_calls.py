"""Tool (function) calling: OpenAI's training-line format checked, converted for Hugging Face chat templates, and
each model family's tool-call text (Hermes/Qwen, Llama 3.x JSON, Mistral) detected, written and parsed.

OpenAI's shapes: top-level `tools` (or the older `functions`), assistant messages with `tool_calls` (or the older
`function_call`) whose `arguments` is a JSON string, and `tool` messages (or the older `function` ones) with the
result. Chat templates take `tools` as given, `tool_calls` with `function.arguments` as an object, and `tool`
messages only; `chat_inputs` converts one to the other. A template writes a call in its family's text, which
`format_tool_calls` writes and `parse_tool_calls` reads back into OpenAI's `tool_calls` (what serving answers).
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from app.core.error_codes import ErrorCode
from app.ml.jsonl import LineIssue

# The tool-call formats Tuneforge detects in a chat template (or an operator names at registration).
FORMATS = ("hermes", "llama3_json", "mistral")
FORMAT_DESCRIPTIONS = {
    "hermes": 'Hermes/Qwen: <tool_call>{"name": …, "arguments": {…}}</tool_call>, one block per call',
    "llama3_json": 'Llama 3.x: a bare JSON object {"name": …, "parameters": {…}}',
    "mistral": 'Mistral: [TOOL_CALLS] [{"name": …, "arguments": {…}, "id": …}]',
}

# Bounds on a line's tool parts (the line itself is at most 1 MiB and 32 levels deep: app.ml.jsonl). Every tool
# definition is rendered into the prompt of every example of the line, and every call is a span to locate.
MAX_TOOLS = 128  # tools (or functions) declared by one line: OpenAI's limit for a request
MAX_TOOL_CALLS = 32  # calls in one assistant message
MAX_SCHEMA_DEPTH = 16  # nesting of a function's `parameters` schema
MAX_TOOL_CALL_ID_CHARS = 256
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
TOOL_FIELDS = {"type", "function"}
FUNCTION_FIELDS = {"name", "description", "parameters", "strict"}
CALL_FIELDS = {"id", "type", "function"}
CALL_FUNCTION_FIELDS = {"name", "arguments"}
RESULT_ROLES = ("tool", "function")
# Mistral's templates need tool-call ids of exactly nine letters and digits; others do not render ids at all.
TEMPLATE_ID = re.compile(r"[A-Za-z0-9]{9}")


def _quote(value: str, limit: int = 64) -> str:
    """A user's string in a message, cut so that the message never grows with the line."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else f'{text[: limit - 1]}…"'


def is_tool_record(record: dict[str, Any]) -> bool:
    """Whether a chat line uses tool calling anywhere: tools declared, calls made or results given."""
    if any(key in record for key in ("tools", "functions", "parallel_tool_calls")):
        return True
    messages = record.get("messages")
    return isinstance(messages, list) and any(
        isinstance(m, dict) and ("tool_calls" in m or "function_call" in m or m.get("role") in RESULT_ROLES)
        for m in messages
    )


def _depth(value: Any) -> int:
    """How deep objects and lists nest in `value`, counted up to one past MAX_SCHEMA_DEPTH (no recursion: a JSON
    string of arguments is not bounded by the line's depth)."""
    deepest, stack = 0, [(value, 1)]
    while stack and deepest <= MAX_SCHEMA_DEPTH:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _check_function(spec: Any, where: str) -> str:
    """One function definition (OpenAI's `function` object); its name."""
    if not isinstance(spec, dict):
        raise LineIssue(ErrorCode.invalid_type, f"{where}: must be an object with a name")
    extra = sorted(set(spec) - FUNCTION_FIELDS)
    if extra:
        raise LineIssue(ErrorCode.unknown_field, f"{where}: unknown field {_quote(extra[0])}")
    name = spec.get("name")
    if name is None:
        raise LineIssue(ErrorCode.missing_field, f'{where}: missing field "name"')
    if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
        shown = _quote(name) if isinstance(name, str) else type(name).__name__
        raise LineIssue(ErrorCode.invalid_tool, f"{where}.name: {shown} is not 1-64 letters, digits, '_' or '-'")
    if not isinstance(spec.get("description", ""), str):
        raise LineIssue(ErrorCode.invalid_type, f"{where}.description: must be a string")
    if "parameters" in spec:
        if not isinstance(spec["parameters"], dict):
            raise LineIssue(ErrorCode.invalid_type, f"{where}.parameters: must be a JSON Schema object")
        if _depth(spec["parameters"]) > MAX_SCHEMA_DEPTH:
            raise LineIssue(
                ErrorCode.too_deep, f"{where}.parameters: the schema is nested more than {MAX_SCHEMA_DEPTH} levels deep"
            )
    if not isinstance(spec.get("strict", False), bool):
        raise LineIssue(ErrorCode.invalid_type, f"{where}.strict: must be true or false")
    return name


def declared_functions(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The functions a line declares (`tools`, or the older `functions`), checked: name -> definition."""
    if "tools" in record and "functions" in record:
        raise LineIssue(ErrorCode.invalid_tool, 'give "tools" or the older "functions", not both')
    key = "tools" if "tools" in record else "functions"
    items = record.get(key, [])
    if not isinstance(items, list):
        raise LineIssue(ErrorCode.invalid_type, f'"{key}" must be a list')
    if len(items) > MAX_TOOLS:
        raise LineIssue(ErrorCode.too_many_tools, f'"{key}" has {len(items)} entries; at most {MAX_TOOLS} are allowed')
    declared: dict[str, dict[str, Any]] = {}
    for i, item in enumerate(items):
        where = f"{key}[{i}]"
        if key == "tools":
            if not isinstance(item, dict):
                raise LineIssue(ErrorCode.invalid_type, f'{where}: must be an object {{"type": "function", ...}}')
            extra = sorted(set(item) - TOOL_FIELDS)
            if extra:
                raise LineIssue(ErrorCode.unknown_field, f"{where}: unknown field {_quote(extra[0])}")
            if item.get("type") != "function":
                raise LineIssue(ErrorCode.invalid_tool, f'{where}.type: only "function" tools are supported')
            if "function" not in item:
                raise LineIssue(ErrorCode.missing_field, f'{where}: missing field "function"')
            where, spec = f"{where}.function", item["function"]
        else:
            spec = item
        name = _check_function(spec, where)
        if name in declared:
            raise LineIssue(ErrorCode.invalid_tool, f"{where}.name: {_quote(name)} is declared twice")
        declared[name] = spec
    return declared


def _arguments(value: Any, where: str) -> dict[str, Any]:
    """A call's arguments as an object: OpenAI sends a JSON string (an object is taken as it is)."""
    if isinstance(value, dict):
        return value
    if not isinstance(value, str):
        raise LineIssue(
            ErrorCode.invalid_tool_call,
            f"{where}: must be a string of JSON (as OpenAI sends it), got {type(value).__name__}",
        )
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise LineIssue(
            ErrorCode.invalid_tool_call, f"{where}: not valid JSON ({exc.msg} at column {exc.colno})"
        ) from None
    except (RecursionError, ValueError):
        raise LineIssue(ErrorCode.invalid_tool_call, f"{where}: not valid JSON") from None
    if not isinstance(parsed, dict):
        raise LineIssue(ErrorCode.invalid_tool_call, f"{where}: must be a JSON object, got {type(parsed).__name__}")
    if _depth(parsed) > MAX_SCHEMA_DEPTH:
        raise LineIssue(ErrorCode.too_deep, f"{where}: nested more than {MAX_SCHEMA_DEPTH} levels deep")
    return parsed


@dataclass
class ToolLineChecker:
    """The tool-calling rules of one chat line, checked while its messages are walked in order (by
    app.files.validation): declared names, JSON arguments, every call answered before the conversation goes on.

    Calls of the last assistant message may go unanswered (OpenAI's own examples end with the call the model is
    to learn to make), but only all of them: a conversation that answers some calls and ends is refused.
    """

    record: dict[str, Any]
    whole: str = "the line"  # what the record is, in messages ("the request" when a chat request is checked)
    declared: dict[str, dict[str, Any]] = field(init=False)
    parallel: bool = field(init=False)
    pending: dict[str, str] = field(init=False, default_factory=dict)  # call id -> function name
    pending_at: int = field(init=False, default=-1)  # the message that made the pending calls
    answered: int = field(init=False, default=0)  # results given since those calls
    legacy: str | None = field(init=False, default=None)  # the function a pending `function_call` named
    seen_ids: set[str] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self.declared = declared_functions(self.record)
        parallel = self.record.get("parallel_tool_calls", True)
        if not isinstance(parallel, bool):
            raise LineIssue(ErrorCode.invalid_type, '"parallel_tool_calls" must be true or false')
        self.parallel = parallel

    def _name(self, function: Any, where: str) -> str:
        if not isinstance(function, dict):
            raise LineIssue(ErrorCode.invalid_type, f'{where}: must be an object {{"name", "arguments"}}')
        extra = sorted(set(function) - CALL_FUNCTION_FIELDS)
        if extra:
            raise LineIssue(ErrorCode.unknown_field, f"{where}: unknown field {_quote(extra[0])}")
        for key in ("name", "arguments"):
            if key not in function:
                raise LineIssue(ErrorCode.missing_field, f'{where}: missing field "{key}"')
        name = function["name"]
        if not isinstance(name, str):
            raise LineIssue(ErrorCode.invalid_type, f"{where}.name: must be a string")
        if name not in self.declared:
            declared = f'"{"tools" if "tools" in self.record else "functions"}"' if self.declared else 'no "tools"'
            raise LineIssue(
                ErrorCode.undeclared_function,
                f"{where}.name: {_quote(name)} is not a declared function ({self.whole} declares {declared})",
            )
        _arguments(function["arguments"], f"{where}.arguments")
        return name

    def before(self, i: int, role: str) -> None:
        """Called for every message: a message other than a result may not come while calls are unanswered."""
        if role in RESULT_ROLES:
            return
        if self.pending:
            call_id = next(iter(self.pending))
            raise LineIssue(
                ErrorCode.unanswered_tool_call,
                f'messages[{self.pending_at}]: tool call {_quote(call_id)} is not answered: a "tool" message '
                f'with "tool_call_id": {_quote(call_id)} must come before messages[{i}]',
            )
        if self.legacy is not None:
            raise LineIssue(
                ErrorCode.unanswered_tool_call,
                f'messages[{self.pending_at}]: the "function_call" is not answered: a "function" message must come '
                f"before messages[{i}]",
            )

    def calls(self, i: int, message: dict[str, Any]) -> bool:
        """An assistant message's `tool_calls` or `function_call`, checked; whether it has any."""
        where = f"messages[{i}]"
        if "tool_calls" in message and "function_call" in message:
            raise LineIssue(ErrorCode.invalid_tool_call, f'{where}: give "tool_calls" or "function_call", not both')
        if "function_call" in message:
            self.legacy = self._name(message["function_call"], f"{where}.function_call")
            self.pending_at, self.answered = i, 0
            return True
        if "tool_calls" not in message:
            return False
        calls = message["tool_calls"]
        if not isinstance(calls, list) or not calls:
            raise LineIssue(ErrorCode.invalid_type, f"{where}.tool_calls: must be a non-empty list")
        if len(calls) > MAX_TOOL_CALLS:
            raise LineIssue(
                ErrorCode.too_many_tool_calls,
                f"{where}.tool_calls: {len(calls)} calls; at most {MAX_TOOL_CALLS} are allowed in one message",
            )
        if len(calls) > 1 and not self.parallel:
            raise LineIssue(
                ErrorCode.too_many_tool_calls,
                f'{where}.tool_calls: {len(calls)} calls, but {self.whole} sets "parallel_tool_calls": false',
            )
        for j, call in enumerate(calls):
            at = f"{where}.tool_calls[{j}]"
            if not isinstance(call, dict):
                raise LineIssue(ErrorCode.invalid_type, f'{at}: must be an object {{"id", "type", "function"}}')
            extra = sorted(set(call) - CALL_FIELDS)
            if extra:
                raise LineIssue(ErrorCode.unknown_field, f"{at}: unknown field {_quote(extra[0])}")
            call_id = call.get("id")
            if call_id is None:
                raise LineIssue(ErrorCode.missing_field, f'{at}: missing field "id"')
            if not isinstance(call_id, str) or not call_id or len(call_id) > MAX_TOOL_CALL_ID_CHARS:
                raise LineIssue(
                    ErrorCode.invalid_tool_call, f"{at}.id: must be a string of 1-{MAX_TOOL_CALL_ID_CHARS} characters"
                )
            if call_id in self.seen_ids:
                raise LineIssue(
                    ErrorCode.invalid_tool_call, f"{at}.id: {_quote(call_id)} is used twice in {self.whole}"
                )
            if call.get("type", "function") != "function":
                raise LineIssue(ErrorCode.invalid_tool_call, f'{at}.type: must be "function"')
            if "function" not in call:
                raise LineIssue(ErrorCode.missing_field, f'{at}: missing field "function"')
            self.pending[call_id] = self._name(call["function"], f"{at}.function")
            self.seen_ids.add(call_id)
        self.pending_at, self.answered = i, 0
        return True

    def result(self, i: int, role: str, message: dict[str, Any]) -> None:
        """A `tool` (or older `function`) message: it must answer a call still pending."""
        where = f"messages[{i}]"
        if role == "function":
            if self.legacy is None:
                raise LineIssue(
                    ErrorCode.unmatched_tool_result,
                    f'{where}: a "function" message must answer an assistant "function_call" just before it',
                )
            if message.get("name") != self.legacy:
                raise LineIssue(
                    ErrorCode.unmatched_tool_result,
                    f'{where}.name: must be {_quote(self.legacy)}, the function the "function_call" before it names',
                )
            self.legacy = None
            return
        if "tool_call_id" not in message:
            raise LineIssue(ErrorCode.missing_field, f'{where}: missing field "tool_call_id"')
        call_id = message["tool_call_id"]
        if not isinstance(call_id, str):
            raise LineIssue(ErrorCode.invalid_type, f"{where}.tool_call_id: must be a string")
        if call_id not in self.pending:
            raise LineIssue(
                ErrorCode.unmatched_tool_result,
                f"{where}.tool_call_id: {_quote(call_id)} answers no unanswered call of the assistant message "
                "before it",
            )
        del self.pending[call_id]
        self.answered += 1

    def finish(self) -> None:
        if self.pending and self.answered:
            call_id = next(iter(self.pending))
            raise LineIssue(
                ErrorCode.unanswered_tool_call,
                f"messages[{self.pending_at}]: tool call {_quote(call_id)} is not answered, while other calls of "
                "that message are: answer every call, or none (to end the conversation with the calls)",
            )


def template_id(call_id: str) -> str:
    """The id a chat template sees: nine letters and digits (what Mistral's templates require), the same for the
    same id, so that a call and its result still match; ids that already are nine are kept."""
    if TEMPLATE_ID.fullmatch(call_id):
        return call_id
    return hashlib.sha256(call_id.encode()).hexdigest()[:9]


def _template_call(call_id: str, function: dict[str, Any]) -> dict[str, Any]:
    arguments = function["arguments"]
    return {
        "id": template_id(call_id),
        "type": "function",
        "function": {
            "name": function["name"],
            "arguments": json.loads(arguments) if isinstance(arguments, str) else arguments,
        },
    }


def chat_inputs(record: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """A checked chat line's messages and tools as Hugging Face chat templates take them (tools None: the line
    has none; its messages are then returned as they are).

    Calls get `function.arguments` as an object and template ids (`template_id`); an assistant message with calls
    and no content gets `""`; the older `function_call` becomes one tool call and a `function` message a `tool`
    message answering it. `weight` stays on each message (templates ignore it; the loss mask reads it)."""
    messages: list[dict[str, Any]] = record["messages"]
    if not is_tool_record(record):
        return messages, None
    if "functions" in record:
        tools = [{"type": "function", "function": spec} for spec in record["functions"]]
    else:
        tools = list(record.get("tools", []))
    converted: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # template call id -> function name
    legacy_id = ""
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "assistant" and ("tool_calls" in message or "function_call" in message):
            if "function_call" in message:
                legacy_id = f"function_call_{i}"
                calls = [_template_call(legacy_id, message["function_call"])]
            else:
                calls = [_template_call(c["id"], c["function"]) for c in message["tool_calls"]]
            names.update((c["id"], c["function"]["name"]) for c in calls)
            rest = {k: v for k, v in message.items() if k not in ("tool_calls", "function_call", "content")}
            converted.append({**rest, "content": message.get("content") or "", "tool_calls": calls})
        elif role in RESULT_ROLES:
            call_id = template_id(legacy_id if role == "function" else message["tool_call_id"])
            converted.append(
                {"role": "tool", "tool_call_id": call_id, "name": names.get(call_id, ""), "content": message["content"]}
            )
        else:
            converted.append(message)
    return converted, tools


# --- each family's text ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedOutput:
    """A model's output read as OpenAI's assistant message: its text (None if it is only calls) and `tool_calls`
    ({"id", "type": "function", "function": {"name", "arguments": a JSON string}})."""

    content: str | None
    tool_calls: list[dict[str, Any]]


def _openai_call(name: Any, arguments: Any, call_id: Any = None) -> dict[str, Any] | None:
    """An OpenAI tool call from what a model wrote, or None when it is not one (no name, arguments not an object)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(name, str) or not name or not isinstance(arguments, dict):
        return None
    return {
        "id": call_id if isinstance(call_id, str) and call_id else f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


_DECODER = json.JSONDecoder()


def _json_at(text: str, at: int) -> tuple[Any, int] | None:
    """The JSON value starting at `at` (after whitespace) and where it ends, or None."""
    while at < len(text) and text[at].isspace():
        at += 1
    try:
        return _DECODER.raw_decode(text, at)
    except ValueError:
        return None


def _parse_hermes(text: str) -> ParsedOutput:
    calls: list[dict[str, Any]] = []
    at = text.find("<tool_call>")
    if at < 0:
        return ParsedOutput(text, [])
    content = text[:at].strip()
    while at >= 0:
        found = _json_at(text, at + len("<tool_call>"))
        if found is None or not isinstance(found[0], dict):
            return ParsedOutput(text, [])  # not a call after all: the text is the answer
        body, end = found
        call = _openai_call(body.get("name"), body.get("arguments", body.get("parameters")))
        if call is None:
            return ParsedOutput(text, [])
        calls.append(call)
        rest = text[end:].lstrip()
        rest = rest.removeprefix("</tool_call>")  # absent when generation stopped at the closing tag
        at = rest.find("<tool_call>")
        if at < 0 and rest.strip():
            return ParsedOutput(text, [])  # text after the calls: not a tool-call answer
        text = rest
    return ParsedOutput(content or None, calls)


def _parse_llama3_json(text: str) -> ParsedOutput:
    body = text.strip().removeprefix("<|python_tag|>").lstrip()
    if not body.startswith("{"):
        return ParsedOutput(text, [])
    calls: list[dict[str, Any]] = []
    at = 0
    while True:
        found = _json_at(body, at)
        if found is None or not isinstance(found[0], dict):
            return ParsedOutput(text, [])
        value, at = found
        call = _openai_call(value.get("name"), value.get("parameters", value.get("arguments")))
        if call is None:
            return ParsedOutput(text, [])
        calls.append(call)
        rest = body[at:].lstrip()
        if not rest:
            return ParsedOutput(None, calls)
        if not rest.startswith(";"):
            return ParsedOutput(text, [])
        at = len(body) - len(rest) + 1


def _parse_mistral(text: str) -> ParsedOutput:
    at = text.find("[TOOL_CALLS]")
    if at < 0:
        return ParsedOutput(text, [])
    content = text[:at].strip()
    found = _json_at(text, at + len("[TOOL_CALLS]"))
    if found is None or not isinstance(found[0], list) or not found[0] or text[found[1] :].strip():
        return ParsedOutput(text, [])
    calls = []
    for item in found[0]:
        call = _openai_call(item.get("name"), item.get("arguments"), item.get("id")) if isinstance(item, dict) else None
        if call is None:
            return ParsedOutput(text, [])
        calls.append(call)
    return ParsedOutput(content or None, calls)


_PARSERS = {"hermes": _parse_hermes, "llama3_json": _parse_llama3_json, "mistral": _parse_mistral}


def parse_tool_calls(fmt: str, text: str) -> ParsedOutput:
    """What a model of the family `fmt` wrote (decoded with its special tokens, end-of-turn token left out), read
    as OpenAI's message: the calls it makes, and the text before them. Text that is not well-formed calls stays
    text (content), calls included: nothing is guessed."""
    return _PARSERS[fmt](text)


def format_tool_calls(fmt: str, tool_calls: list[dict[str, Any]]) -> str:
    """OpenAI's `tool_calls` as the family `fmt` writes them (what `parse_tool_calls` reads back)."""
    calls = [_template_call(c["id"], c["function"]) for c in tool_calls]
    if fmt == "hermes":
        return "\n".join(
            "<tool_call>\n"
            + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]}, ensure_ascii=False)
            + "\n</tool_call>"
            for c in calls
        )
    if fmt == "llama3_json":
        return "; ".join(
            json.dumps({"name": c["function"]["name"], "parameters": c["function"]["arguments"]}, ensure_ascii=False)
            for c in calls
        )
    if fmt == "mistral":
        items = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"], "id": c["id"]} for c in calls]
        return "[TOOL_CALLS] " + json.dumps(items, ensure_ascii=False)
    raise ValueError(f"unknown tool-call format {fmt!r}; one of {', '.join(FORMATS)}")


# --- detection ------------------------------------------------------------------------------------------------

_PROBE_ARGUMENTS = {"word": "quince"}
_PROBE_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "lookup_word",
            "description": "Look a word up in the dictionary.",
            "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]},
        },
    }
]
_PROBE_CALL = {
    "id": "call00001",
    "type": "function",
    "function": {"name": "lookup_word", "arguments": _PROBE_ARGUMENTS},
}
_PROBE: list[dict[str, Any]] = [
    {"role": "user", "content": "What does the word on my list mean?"},
    {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]},
    {"role": "tool", "tool_call_id": "call00001", "name": "lookup_word", "content": "a yellow pome fruit"},
    {"role": "assistant", "content": "A quince is a yellow pome fruit."},
]


def _render(tokenizer: Any, messages: list[dict[str, Any]], *, add_generation_prompt: bool) -> str:
    return str(
        tokenizer.apply_chat_template(
            messages, tools=_PROBE_TOOLS, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    )


def _without_trailing_tokens(tokenizer: Any, text: str) -> str:
    """`text` less the special tokens (end of turn, end of sequence) and whitespace at its end."""
    special = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
    special |= {str(t.content) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    special.discard("")
    text = text.rstrip()
    while ending := next((t for t in special if text.endswith(t)), None):
        text = text[: -len(ending)].rstrip()
    return text


def _probe(tokenizer: Any) -> str | None:
    """The text the chat template writes for the probe's call (with what follows the prompt up to its end of
    turn), or None when the template does not render tool calling: the tool's definition, the call's name and
    arguments and the tool's result must all show."""
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    try:
        prompt = _render(tokenizer, _PROBE[:1], add_generation_prompt=True)
        turn = _render(tokenizer, _PROBE[:2], add_generation_prompt=False)
        full = _render(tokenizer, _PROBE, add_generation_prompt=False)
    except Exception:  # a template that refuses tools or tool messages has no tool support
        return None
    call_text = turn[len(prompt) :] if turn.startswith(prompt) else turn
    shown = (
        "Look a word up in the dictionary." in prompt
        and "lookup_word" in call_text
        and "quince" in call_text
        and "a yellow pome fruit" in full
    )
    return call_text if shown else None


def renders_tool_calls(tokenizer: Any) -> bool:
    """Whether the model's chat template renders tool calling at all (declared tools, calls and results)."""
    return _probe(tokenizer) is not None


def detect_tool_call_format(tokenizer: Any) -> str | None:
    """The family whose tool-call text the model's chat template writes (the probe's call parsed back exactly by
    that family's parser), or None: no tool support, or a family Tuneforge does not know."""
    call_text = _probe(tokenizer)
    if call_text is None:
        return None
    for fmt in FORMATS:
        for candidate in (call_text, _without_trailing_tokens(tokenizer, call_text)):
            parsed = parse_tool_calls(fmt, candidate)
            made = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.tool_calls]
            if made == [("lookup_word", _PROBE_ARGUMENTS)]:
                return fmt
    return None


# --- at inference: calls constrained to the declared functions, and streamed ----------------------------------

# What begins a call in each family's text (Llama 3.x JSON calls have no marker: a call is an answer that is a
# JSON object, optionally after <|python_tag|>).
CALL_MARKERS = {"hermes": ("<tool_call>", "</tool_call>"), "mistral": ("[TOOL_CALLS]", None)}
LLAMA3_TAG = "<|python_tag|>"
# Calls as chat templates write them (Jinja's `tojson`: Python's default separators), so that a constrained call
# reads as the calls the model was trained on.
CALL_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": False}


def _call_schema(fmt: str, functions: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON schema of one call in `fmt`'s text to any of `functions` (OpenAI `function` objects): the name one
    of theirs, the arguments matching that function's `parameters` (any object where it declares none)."""
    arguments = "parameters" if fmt == "llama3_json" else "arguments"
    options = []
    for function in functions:
        properties: dict[str, Any] = {
            "name": {"const": function["name"]},
            arguments: function.get("parameters") or {"type": "object"},
        }
        if fmt == "mistral":  # Mistral's templates write each call's id after it (nine letters and digits)
            properties["id"] = {"type": "string", "pattern": TEMPLATE_ID.pattern}
        options.append(
            {
                "type": "object",
                "properties": properties,
                "required": ["name", arguments],
                "additionalProperties": False,
            }
        )
    return options[0] if len(options) == 1 else {"anyOf": options}


def _lark_json(schema: dict[str, Any], options: dict[str, Any]) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": options}, ensure_ascii=False)


def _lark_text(text: str, special: dict[str, int]) -> str:
    """A fixed piece of text in a Lark rule: the special token of that text where the tokenizer has one (by its id:
    a string cannot match a special token), else the string."""
    return f"<[{special[text]}]>" if text in special else json.dumps(text, ensure_ascii=False)


def call_grammar(
    fmt: str,
    functions: list[dict[str, Any]],
    *,
    parallel: bool,
    special: dict[str, int],
    content: dict[str, Any] | None = None,
    content_options: dict[str, Any] | None = None,
) -> str:
    """A Lark grammar (llguidance's dialect) of an answer that is one call, or up to MAX_TOOL_CALLS with `parallel`,
    to `functions` in `fmt`'s text, as that family's chat template writes calls; with `content` (a JSON schema
    and its JSON options), an answer matching it is allowed instead. `special`: the tokenizer's special tokens (text
    -> id; `special_tokens`)."""
    more = MAX_TOOL_CALLS - 1 if parallel else 0

    def repeated(separator: str) -> str:
        return f"calls: call ({json.dumps(separator)} call){{0,{more}}}" if more else "calls: call"

    one = _lark_json(_call_schema(fmt, functions), CALL_JSON_OPTIONS)
    if fmt == "hermes":
        opening, closing = CALL_MARKERS["hermes"]
        rules = [
            repeated("\n"),
            f'call: {_lark_text(opening, special)} "\\n" {one} "\\n" {_lark_text(str(closing), special)}',
        ]
    elif fmt == "llama3_json":
        rules = [repeated("; "), f"call: {one}"]
    elif fmt == "mistral":
        items = {"type": "array", "items": _call_schema(fmt, functions), "minItems": 1, "maxItems": more + 1}
        rules = [f'calls: {_lark_text(CALL_MARKERS["mistral"][0], special)} " " {_lark_json(items, CALL_JSON_OPTIONS)}']
    else:
        raise ValueError(f"unknown tool-call format {fmt!r}; one of {', '.join(FORMATS)}")
    if content is None:
        return "\n".join(["start: calls", *rules])
    return "\n".join(["start: calls | content", *rules, f"content: {_lark_json(content, content_options or {})}"])


def special_tokens(tokenizer: Any) -> dict[str, int]:
    """A Hugging Face tokenizer's special tokens, text -> id (what a grammar must name by id)."""
    return {str(t.content): int(i) for i, t in tokenizer.added_tokens_decoder.items() if t.special}


class StreamedCalls:
    """A streamed answer of a model that may call tools, split as it comes: text passes on as content until a call
    begins (text that could be the start of one is held back until it is known); from there the answer is
    buffered, and read at its end as calls (`finish`), or, when it does not parse as calls, passed on as content
    after all."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.text = ""
        self.sent = 0  # characters passed on as content
        self.calling = False  # a call began: the rest is buffered
        self.free = False  # (Llama 3.x JSON) the answer began as text: no call can follow

    def feed(self, piece: str) -> str:
        """The content to pass on now that `piece` came."""
        self.text += piece
        if self.calling:
            return ""
        ready = len(self.text)
        if self.fmt == "llama3_json":
            if not self.free:
                start = self.text.lstrip()
                if start.startswith(("{", LLAMA3_TAG)):
                    self.calling = True
                    return ""
                if not start or LLAMA3_TAG.startswith(start):
                    return ""
                self.free = True
        else:
            marker = CALL_MARKERS[self.fmt][0]
            at = self.text.find(marker, max(0, self.sent - len(marker)))
            if at >= 0:
                self.calling = True
                ready = at
            else:
                ready -= next((k for k in range(len(marker) - 1, 0, -1) if self.text.endswith(marker[:k])), 0)
        content = self.text[self.sent : ready]
        self.sent = max(self.sent, ready)
        return content

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """The content still to pass on, and the calls the answer makes (none: it was text after all)."""
        rest = self.text[self.sent :]
        self.sent = len(self.text)
        if not self.calling:
            return rest, []
        parsed = parse_tool_calls(self.fmt, self.text)
        return ("", parsed.tool_calls) if parsed.tool_calls else (rest, [])
