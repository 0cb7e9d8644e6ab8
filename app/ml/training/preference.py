"""Preference pairs for DPO: each line's preferred and non-preferred conversations encoded as two examples (loss
labels on the output only), kept together through steps and micro-batches, with their reference log-probabilities
once computed."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from app.ml.formatting import EncodedExample, encode_record
from app.ml.preference import conversations
from app.ml.training.data import collate


@dataclass
class PreferencePair:
    chosen: EncodedExample
    rejected: EncodedExample
    # The reference policy's summed log-probabilities of (chosen, rejected) outputs, where they are computed once
    # before training (precomputed reference); None where the reference is computed alongside each step.
    reference: tuple[float, float] | None = None

    @property
    def width(self) -> int:
        return max(len(self.chosen.input_ids), len(self.rejected.input_ids))

    @property
    def n_tokens(self) -> int:
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


@dataclass
class PreferenceDataset:
    examples: list[PreferencePair]
    n_truncated: int
    n_dropped: int


def _cut(example: EncodedExample, max_seq_length: int) -> EncodedExample:
    return EncodedExample(example.input_ids[:max_seq_length], example.labels[:max_seq_length])


def encode_pairs(records: Iterable[dict[str, Any]], tokenizer: Any, max_seq_length: int) -> PreferenceDataset:
    """Tokenize every preference line into a pair; cut each side to max_seq_length; drop the pairs left with an
    output that has nothing to compare (cut away entirely)."""
    pairs: list[PreferencePair] = []
    truncated = dropped = 0
    for record in records:
        chosen, rejected = (encode_record(tokenizer, chat) for chat in conversations(record))
        if max(len(chosen.input_ids), len(rejected.input_ids)) > max_seq_length:
            truncated += 1
            chosen, rejected = _cut(chosen, max_seq_length), _cut(rejected, max_seq_length)
        if chosen.n_loss_tokens == 0 or rejected.n_loss_tokens == 0:
            dropped += 1
            continue
        pairs.append(PreferencePair(chosen, rejected))
    return PreferenceDataset(pairs, truncated, dropped)


def pair_micro_batches(
    pairs: list[PreferencePair], max_batch_tokens: int, extra_positions: int = 0
) -> list[list[PreferencePair]]:
    """Groups of pairs whose padded rows (both sides of every pair, each as wide as the group's widest, plus the
    method's `extra_positions`: virtual tokens) stay within max_batch_tokens: a pair's two sides always share a
    micro-batch. Sorted by width, so each group pads little; a pair wider than the budget on its own is a group
    by itself."""
    groups: list[list[PreferencePair]] = []
    current: list[PreferencePair] = []
    for pair in sorted(pairs, key=lambda p: p.width):
        if current and 2 * (len(current) + 1) * (pair.width + extra_positions) > max_batch_tokens:
            groups.append(current)
            current = []
        current.append(pair)
    if current:
        groups.append(current)
    return groups


def collate_pairs(pairs: list[PreferencePair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Rows: every pair's chosen side, then every pair's rejected side (TRL's order), right-padded."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_token_id)
