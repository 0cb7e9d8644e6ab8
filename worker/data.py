"""Training data: JSONL from the object store -> token ids and labels -> steps -> padded micro-batches."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from app.core.storage import ObjectStorage
from app.ml.formatting import IGNORE_INDEX, EncodedExample, encode_record
from app.ml.jsonl import LineIssue, read_records
from worker.errors import TrainingError


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
    try:
        records = list(read_records(storage.iter_bytes(key)))  # the validator's reader: same lines, same JSON
    except LineIssue as issue:  # only a file accepted by an older validator can get here
        raise TrainingError(f"the training data cannot be read: {issue.message}") from None
    for _, record in records:
        encoded = encode_record(tokenizer, record)
        if len(encoded.input_ids) > max_seq_length:
            truncated += 1
            encoded = EncodedExample(encoded.input_ids[:max_seq_length], encoded.labels[:max_seq_length])
        if encoded.n_loss_tokens == 0:
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
    examples: list[EncodedExample], batch_size: int, *, shuffle_seed: int | None
) -> Iterator[list[EncodedExample]]:
    """The examples of each optimizer step, in a seeded shuffled order (or as stored)."""
    order = list(range(len(examples)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield [examples[i] for i in order[start : start + batch_size]]


def micro_batches(
    examples: list[EncodedExample], max_batch_tokens: int, extra_positions: int = 0
) -> list[list[EncodedExample]]:
    """Split examples into groups whose padded size (examples x (longest + extra_positions)) stays within
    max_batch_tokens; `extra_positions` are what the method adds to every row (virtual tokens).

    Sorted by length first, so each group pads little; a sum of per-token losses does not depend on the
    order. An example longer than the budget on its own is a group by itself.
    """
    groups: list[list[EncodedExample]] = []
    current: list[EncodedExample] = []
    for example in sorted(examples, key=lambda e: len(e.input_ids)):
        # Ascending lengths: the example being added sets the group's padded width.
        if current and (len(current) + 1) * (len(example.input_ids) + extra_positions) > max_batch_tokens:
            groups.append(current)
            current = []
        current.append(example)
    if current:
        groups.append(current)
    return groups
