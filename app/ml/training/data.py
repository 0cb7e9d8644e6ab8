"""Training data: records -> token ids and labels -> steps -> micro-batches: padded, or packed (several examples to
a row, each attending only to itself) where the method allows."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from app.ml.blobs import BlobStore
from app.ml.formatting import IGNORE_INDEX, EncodedExample, encode_record
from app.ml.jsonl import LineIssue, read_records
from app.ml.training.protocols import TrainingError

T = TypeVar("T")  # an example: EncodedExample, or a preference pair


@dataclass
class Dataset:
    examples: list[EncodedExample]
    n_truncated: int
    n_dropped: int

    @property
    def n_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)


def read_examples(blobs: BlobStore, key: str) -> list[dict[str, Any]]:
    """The records of a stored JSONL file, read with the validator's reader: same lines, same JSON."""
    try:
        return [record for _, record in read_records(blobs.iter_bytes(key))]
    except LineIssue as issue:  # only a file accepted by an older validator can get here
        raise TrainingError(f"the training data cannot be read: {issue.message}") from None


def encode_examples(records: Iterable[dict[str, Any]], tokenizer: Any, max_seq_length: int) -> Dataset:
    """Tokenize every record; cut to max_seq_length; drop those left with nothing to learn from."""
    examples: list[EncodedExample] = []
    truncated = dropped = 0
    for record in records:
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


def batches(examples: list[T], batch_size: int, *, shuffle_seed: int | None) -> Iterator[list[T]]:
    """The examples of each optimizer step, in a seeded shuffled order (or as stored)."""
    order = list(range(len(examples)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield [examples[i] for i in order[start : start + batch_size]]


class HasInputIds(Protocol):
    @property
    def input_ids(self) -> list[int]: ...


Sized = TypeVar("Sized", bound=HasInputIds)


def micro_batches(examples: list[Sized], max_batch_tokens: int, extra_positions: int = 0) -> list[list[Sized]]:
    """Split examples into groups whose padded size (examples x (longest + extra_positions)) stays within
    max_batch_tokens; `extra_positions` are what the method adds to every row (virtual tokens).

    Sorted by length first, so each group pads little; a sum of per-token losses does not depend on the
    order. An example longer than the budget on its own is a group by itself.
    """
    groups: list[list[Sized]] = []
    current: list[Sized] = []
    for example in sorted(examples, key=lambda e: len(e.input_ids)):
        # Ascending lengths: the example being added sets the group's padded width.
        if current and (len(current) + 1) * (len(example.input_ids) + extra_positions) > max_batch_tokens:
            groups.append(current)
            current = []
        current.append(example)
    if current:
        groups.append(current)
    return groups


# A packed row holds examples up to this many tokens (or the step's longest example, if longer): long enough that
# rows are nearly full, short enough that attention over a row (computed densely, with a block mask) stays cheap.
PACK_ROW_TOKENS = 512


def packed_micro_batches(
    examples: list[EncodedExample], max_batch_tokens: int, row_tokens: int = PACK_ROW_TOKENS
) -> list[list[list[EncodedExample]]]:
    """Examples packed into rows of about max(row_tokens, longest example) tokens — as few rows as that takes,
    balanced (each example, longest first, joins the shortest row) so that rows pad little to the widest —
    and the rows grouped into micro-batches of at most max_batch_tokens (rows x widest row), or one row alone
    if it is wider. Padding is left only at the ends of rows."""
    ordered = sorted(examples, key=lambda e: len(e.input_ids), reverse=True)
    if not ordered:
        return []
    capacity = max(len(ordered[0].input_ids), min(row_tokens, max_batch_tokens))
    total = sum(len(e.input_ids) for e in ordered)
    rows: list[list[EncodedExample]] = [[] for _ in range(-(-total // capacity))]
    lengths = [0] * len(rows)
    for example in ordered:
        shortest = min(range(len(rows)), key=lengths.__getitem__)
        if lengths[shortest] + len(example.input_ids) > capacity:  # never past the capacity: a row more
            rows.append([])
            lengths.append(0)
            shortest = len(rows) - 1
        rows[shortest].append(example)
        lengths[shortest] += len(example.input_ids)
    rows = [row for _, row in sorted(zip(lengths, rows, strict=True), key=lambda pair: pair[0], reverse=True)]
    groups: list[list[list[EncodedExample]]] = []
    for row in rows:  # widest first: a group's first row sets its width
        if groups:
            width = sum(len(e.input_ids) for e in groups[-1][0])
            if (len(groups[-1]) + 1) * width <= max_batch_tokens:
                groups[-1].append(row)
                continue
        groups.append([row])
    return groups


def collate_packed(rows: list[list[EncodedExample]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Rows of packed examples: `position_ids` start again at 0 with each example (which is how the model's
    attention mask keeps examples apart: transformers' packed-sequence masks), `labels` ignore each example's
    first token (the previous example's last position would predict it) and the padding at the row's end (its
    own positions, so that it is a segment of its own)."""
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for example in row:
            n = len(example.input_ids)
            input_ids[r, at : at + n] = torch.tensor(example.input_ids)
            labels[r, at + 1 : at + n] = torch.tensor(example.labels[1:])
            position_ids[r, at : at + n] = torch.arange(n)
            at += n
        position_ids[r, at:] = torch.arange(width - at)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
