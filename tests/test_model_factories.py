"""Checks that the tiny model factories build loadable, distinct model folders with incremental chat templates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tests.model_factories import ARCHITECTURES, build_tiny_model, write_chat_template

TEXT = "Name fruit number 3. banana"
CONVERSATION: list[dict[str, str]] = [
    {"role": "user", "content": "Name fruit number 3."},
    {"role": "assistant", "content": "cherry"},
    {"role": "user", "content": "And number 8?"},
    {"role": "assistant", "content": "plum"},
]
SYSTEM: dict[str, str] = {"role": "system", "content": "Answer with one fruit name."}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build_tiny_model(arch, root / arch) for arch in ARCHITECTURES}


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert isinstance(rendered, str)
    return rendered


def _assert_incremental(tokenizer: Any, messages: list[dict[str, str]]) -> None:
    full = _render(tokenizer, messages, add_generation_prompt=False)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        assert full.startswith(prompt), (prompt, full)
        assert full.startswith(through), (through, full)
        assert through.startswith(prompt) and message["content"] in through[len(prompt) :]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_folder_loads_and_runs(arch: str, folders: dict[str, Path]) -> None:
    folder = folders[arch]
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (folder / name).is_file(), name
    assert sum(f.stat().st_size for f in folder.iterdir()) < 4_000_000

    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == arch
    assert config.max_position_embeddings == 512

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.eos_token is not None and tokenizer.eos_token_id is not None
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert tokenizer.decode(ids) == TEXT
    assert len(ids) < len(TEXT)  # merges were learned, not just bytes
    assert tokenizer.decode(tokenizer.encode("kiwi & 99 ~ ü", add_special_tokens=False)) == "kiwi & 99 ~ ü"

    assert tokenizer.chat_template is not None
    _assert_incremental(tokenizer, CONVERSATION)
    _assert_incremental(tokenizer, [SYSTEM, *CONVERSATION])

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.vocab_size == len(tokenizer)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer))


def test_tokenizers_differ(folders: dict[str, Path]) -> None:
    signatures = set()
    for folder in folders.values():
        tokenizer = AutoTokenizer.from_pretrained(folder)
        signatures.add((len(tokenizer), tuple(sorted(tokenizer.all_special_tokens))))
    assert len(signatures) == len(ARCHITECTURES)


def test_no_template_and_template_file(tmp_path: Path) -> None:
    folder = build_tiny_model("gpt2", tmp_path / "gpt2", chat_template=False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template is None

    template = write_chat_template(tmp_path / "gpt2.jinja", "gpt2")
    tokenizer.chat_template = template.read_text(encoding="utf-8")
    _assert_incremental(tokenizer, [SYSTEM, *CONVERSATION])


def test_seeded_and_rng_preserved(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model("qwen2", tmp_path / "a", seed=7)
    assert torch.equal(torch.rand(3), expected)  # the global generator was left as it was

    build_tiny_model("qwen2", tmp_path / "b", seed=7)
    build_tiny_model("qwen2", tmp_path / "c", seed=8)
    a, b, c = ((tmp_path / name / "model.safetensors").read_bytes() for name in "abc")
    assert a == b and a != c
