"""Training data: JSONL from the object store -> token ids and labels -> padded batches."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from app.core.storage import ObjectStorage
from app.ml.formatting import IGNORE_INDEX, EncodedExample, encode_record


@dataclass
class Dataset:
    examples: list[EncodedExample]
    n_truncated: int
    n_dropped: int

    @property
    def n_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)


def load_examples(storage: ObjectStorage, key: str, tokenizer: Any, max_seq_length: int) -> Dataset:
    """Tokenize every record; cut to max_seq_length; drop those left with nothing to learn from."""
    examples: list[EncodedExample] = []
    truncated = dropped = 0
    for line in storage.read_bytes(key).decode("utf-8").splitlines():
        if not line.strip():
            continue
        encoded = encode_record(tokenizer, json.loads(line))
        if len(encoded.input_ids) > max_seq_length:
            truncated += 1
            encoded = EncodedExample(encoded.input_ids[:max_seq_length], encoded.labels[:max_seq_length])
        if encoded.n_trainable == 0:
            dropped += 1
            continue
        examples.append(encoded)
    return Dataset(examples, truncated, dropped)


def collate(examples: list[EncodedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def batches(
    examples: list[EncodedExample], batch_size: int, pad_token_id: int, *, shuffle_seed: int | None
) -> Iterator[dict[str, torch.Tensor]]:
    order = list(range(len(examples)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start : start + batch_size]], pad_token_id)
