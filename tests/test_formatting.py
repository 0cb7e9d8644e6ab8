"""Loss masks: the model learns completions and assistant turns only, with the same tokens serving uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.ml.formatting import IGNORE_INDEX, encode_chat, encode_chat_prompt, encode_prompt, encode_prompt_completion
from app.ml.models import BUILTINS, ModelStore


@pytest.fixture(scope="module")
def tokenizer(model_cache_dir: Path) -> Any:
    return ModelStore(model_cache_dir, None).tokenizer(BUILTINS["tiny-random-llama"])


def trained_text(tokenizer: Any, ids: list[int], labels: list[int]) -> str:
    return str(tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]))


def test_chat_loss_covers_every_assistant_turn_and_nothing_else(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
    example = encode_chat(tokenizer, messages)
    assert trained_text(tokenizer, example.input_ids, example.labels) == "Paris.<|im_end|>\nRome.<|im_end|>\n"
    # The prompt a user sends to /generate is exactly the prefix the model was trained to continue.
    prefix = encode_chat_prompt(tokenizer, messages[:2])
    assert example.input_ids[: len(prefix)] == prefix
    assert all(label == IGNORE_INDEX for label in example.labels[: len(prefix)])


def test_an_assistant_turn_with_weight_0_is_context_not_trained_on(tokenizer: Any) -> None:
    """OpenAI's semantics: `"weight": 0` keeps the turn in the conversation the model sees, without loss on it."""
    messages = [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Lyon.", "weight": 0},
        {"role": "user", "content": "No, try again."},
        {"role": "assistant", "content": "Paris.", "weight": 1},
    ]
    example = encode_chat(tokenizer, messages)
    assert trained_text(tokenizer, example.input_ids, example.labels) == "Paris.<|im_end|>\n"
    assert "Lyon." in tokenizer.decode(example.input_ids)  # still in the context


def test_prompt_completion_loss_covers_the_completion_and_end_of_sequence(tokenizer: Any) -> None:
    example = encode_prompt_completion(tokenizer, "2 + 2 =", " 4")
    assert example.input_ids[: len(encode_prompt(tokenizer, "2 + 2 ="))] == encode_prompt(tokenizer, "2 + 2 =")
    assert trained_text(tokenizer, example.input_ids, example.labels) == " 4<|im_end|>"
    assert example.labels[-1] == tokenizer.eos_token_id
