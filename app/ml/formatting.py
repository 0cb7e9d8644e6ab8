"""Turn examples into token ids and loss labels, and prompts into generation inputs.

Training and serving use the same functions, so a prompt is tokenized the same way in both.
Labels are -100 where no loss is taken: prompts, user and system turns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_loss_tokens(self) -> int:
        """Tokens that carry loss: every label but the first, which no position predicts."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


def render_chat(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt))


def encode_chat(tokenizer: Any, messages: list[dict[str, Any]]) -> EncodedExample:
    """Loss on every assistant turn (its content and end-of-turn token) but those with `"weight": 0` (OpenAI's
    semantics: context the model sees, not text it learns to write), nothing else."""
    full = render_chat(tokenizer, messages, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("weight", 1) == 0:
            continue
        before = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(before) and full.startswith(upto)):
            raise ValueError("the chat template does not render this conversation incrementally")
        spans.append((len(before), len(upto)))
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
        return encode_chat(tokenizer, record["messages"])
    if "prompt" in record:
        return encode_prompt_completion(tokenizer, record["prompt"], record["completion"])
    return encode_text(tokenizer, record["text"])


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def encode_chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    text = render_chat(tokenizer, messages, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
