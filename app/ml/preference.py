"""Preference (DPO) lines in OpenAI's format, as the two conversations they compare.

A line is `{"input": {"messages": [...], "tools"?: [...]}, "preferred_output": [{"role": "assistant", ...}],
"non_preferred_output": [{"role": "assistant", ...}]}`. Each output, after the input's messages, is a chat
example whose only trained turn is that output (the input's own assistant turns are context: `"weight": 0`), so
upload validation, token counting and training encode them with the chat code, tools included.
"""

from __future__ import annotations

import re
from typing import Any

from app.core.error_codes import ErrorCode
from app.ml.jsonl import LineIssue

OUTPUTS = ("preferred_output", "non_preferred_output")
RECORD_FIELDS = ("input", *OUTPUTS)
# What `input` may hold besides `messages`: passed on to the chat record, whose checks decide what is supported.
INPUT_EXTRAS = ("tools", "functions", "parallel_tool_calls")


def is_preference(record: dict[str, Any]) -> bool:
    return any(name in record for name in OUTPUTS) or ("input" in record and "messages" not in record)


def conversations(record: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (preferred, non-preferred) chat records of a preference line; LineIssue naming the field otherwise."""
    extra = sorted(set(record) - set(RECORD_FIELDS))
    if extra:
        raise LineIssue(
            ErrorCode.unknown_field,
            f"unknown field(s) {', '.join(name[:40] for name in extra[:5])}: a preference line has input, "
            "preferred_output and non_preferred_output",
        )
    for name in RECORD_FIELDS:
        if name not in record:
            raise LineIssue(ErrorCode.missing_field, f'missing field "{name}"')
    given = record["input"]
    if not isinstance(given, dict):
        raise LineIssue(ErrorCode.invalid_type, '"input" must be an object with "messages"')
    if "messages" not in given:
        raise LineIssue(ErrorCode.missing_field, 'input: missing field "messages"')
    unknown = sorted(set(given) - {"messages", *INPUT_EXTRAS})
    if unknown:
        raise LineIssue(ErrorCode.unknown_field, f"input: unknown field(s) {', '.join(n[:40] for n in unknown[:5])}")
    messages = given["messages"]
    if not isinstance(messages, list) or not messages:
        raise LineIssue(ErrorCode.invalid_type, "input.messages must be a non-empty list")
    if not all(isinstance(message, dict) for message in messages):
        raise LineIssue(ErrorCode.invalid_type, "input.messages: every message must be an object with role and content")
    # The input's assistant turns are context, never trained on.
    context = [{**m, "weight": 0} if m.get("role") == "assistant" else m for m in messages]
    chats = []
    for name in OUTPUTS:
        output = record[name]
        if not isinstance(output, list) or len(output) != 1 or not isinstance(output[0], dict):
            raise LineIssue(ErrorCode.invalid_type, f'"{name}" must be a list of one assistant message')
        if output[0].get("role") != "assistant":
            raise LineIssue(ErrorCode.invalid_role, f'{name}[0]: the role must be "assistant"')
        if "weight" in output[0]:
            raise LineIssue(ErrorCode.unknown_field, f'{name}[0]: "weight" has no meaning in a preference output')
        chats.append({**{k: v for k, v in given.items() if k != "messages"}, "messages": [*context, output[0]]})
    if chats[0]["messages"][-1] == chats[1]["messages"][-1]:
        raise LineIssue(ErrorCode.invalid_value, "preferred_output and non_preferred_output are the same")
    return chats[0], chats[1]


_MESSAGE_INDEX = re.compile(r"^messages\[(\d+)\]")


def where_in_line(message: str, n_input: int, output: str) -> str:
    """A chat check's message about a conversation built by `conversations`, naming the field of the preference
    line instead (`messages[3]` is `input.messages[3]`, or the output's message)."""
    if message.startswith(tuple(f'"{name}"' for name in INPUT_EXTRAS)):
        return f"input.{message[1:].replace(chr(34), '', 1)}"
    found = _MESSAGE_INDEX.match(message)
    if found is None:
        return message
    index = int(found.group(1))
    field = f"input.messages[{index}]" if index < n_input else f"{output}[{index - n_input}]"
    return field + message[found.end() :]
