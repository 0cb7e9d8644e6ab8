"""Turn examples into token ids and loss labels, and prompts into generation inputs.

Training and serving use the same functions, so a prompt is tokenized the same way in both.
Labels are -100 where no loss is taken: prompts, user and system turns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.ml.tool_calls import chat_inputs

IGNORE_INDEX = -100


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_loss_tokens(self) -> int:
        """Tokens that carry loss: every label but the first, which no position predicts."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


def render_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    return str(
        tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    )


def render_chat_spans(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and, in it, the character span of each assistant turn that is trained on (not
    `"weight": 0`): the turn's own text (content, serialized tool calls, end-of-turn), what the template adds to
    the conversation so far beyond the generation prompt.

    Most templates render incrementally (the conversation up to a turn is a prefix of the whole), and the span is
    where that prefix ends. Some do not: Mistral's put the tools, and the system prompt, with the last user message
    only. Then the turn's text is rendered after the conversation from the user message before it on, and found
    in the whole as the occurrence that follows as many others as the conversation before it holds (an earlier,
    untrained turn with the same text is not taken for it)."""
    full = render_chat(tokenizer, messages, add_generation_prompt=False, tools=tools)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("weight", 1) == 0:
            continue
        before = render_chat(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
        upto = render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False, tools=tools)
        if upto.startswith(before) and full.startswith(upto):
            spans.append((len(before), len(upto)))
            continue
        turn = _turn_text(tokenizer, messages, i, tools) if not upto.startswith(before) else upto[len(before) :]
        found = _occurrences(full, turn)
        earlier = len(_occurrences(before, turn))
        if not turn or len(found) <= earlier or (spans and found[earlier] < spans[-1][1]):
            raise ValueError("the chat template does not render this conversation turn by turn")
        spans.append((found[earlier], found[earlier] + len(turn)))
    return full, spans


def _turn_text(tokenizer: Any, messages: list[dict[str, Any]], i: int, tools: list[dict[str, Any]] | None) -> str:
    """What the template writes for assistant turn `i`, rendered after the conversation from the last user message
    before it (what a template that moves the system prompt or tools to the last user message renders alike)."""
    start = max((j for j in range(i) if messages[j]["role"] == "user"), default=0)
    before = render_chat(tokenizer, messages[start:i], add_generation_prompt=True, tools=tools)
    upto = render_chat(tokenizer, messages[start : i + 1], add_generation_prompt=False, tools=tools)
    if not upto.startswith(before):
        raise ValueError("the chat template does not render this conversation turn by turn")
    return upto[len(before) :]


def _occurrences(text: str, part: str) -> list[int]:
    starts: list[int] = []
    at = text.find(part) if part else -1
    while at >= 0:
        starts.append(at)
        at = text.find(part, at + 1)
    return starts


def encode_chat(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> EncodedExample:
    """Loss on every assistant turn (its content, tool calls and end-of-turn token) but those with `"weight": 0`
    (OpenAI's semantics: context the model sees, not text it learns to write), nothing else: not the prompt, the
    system and user turns, the declared tools or the tools' results."""
    full, spans = render_chat_spans(tokenizer, messages, tools)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        token if any(start <= lo < end for start, end in spans) else IGNORE_INDEX
        for token, (lo, _hi) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]
    return EncodedExample(list(enc["input_ids"]), labels)


def encode_prompt_completion(tokenizer: Any, prompt: str, completion: str) -> EncodedExample:
    """Raw text, no chat template: loss on the completion and the end-of-sequence token."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    completion_ids.append(tokenizer.eos_token_id)
    return EncodedExample(prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids)


def encode_text(tokenizer: Any, text: str) -> EncodedExample:
    """Plain language modelling: loss on every token."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids.append(tokenizer.eos_token_id)
    return EncodedExample(ids, list(ids))


def encode_record(tokenizer: Any, record: dict[str, Any]) -> EncodedExample:
    if "messages" in record:
        return encode_chat(tokenizer, *chat_inputs(record))
    if "prompt" in record:
        return encode_prompt_completion(tokenizer, record["prompt"], record["completion"])
    return encode_text(tokenizer, record["text"])


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def encode_chat_prompt(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> list[int]:
    text = render_chat(tokenizer, messages, add_generation_prompt=True, tools=tools)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
