"""Attention over packed rows, each example apart.

A packed row holds several examples one after the other; transformers keeps them apart with a block-diagonal
mask built from the position ids, and SDPA then computes the whole row's T x T scores and masks most of them away:
for a row of 1,024 tokens made of six chats, about five sixths of the attention's work. Here, when the recipe's
packed pass says where each row's examples start (`packed_segments`), each example's attention is computed on its
own, causal, as SDPA's `is_causal` computes it: the same result, a third of the time on a CPU (bench/training.py).

It takes the place of transformers' `sdpa` entry in its attention registry (`ALL_ATTENTION_FUNCTIONS`) when this
module is imported; every call without `packed_segments` (serving, generation, padded batches, evaluation of other
methods) goes to transformers' own `sdpa_attention_forward`, unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

# The keyword the recipe's packed pass sends down through the decoder to each attention layer.
PACKED_SEGMENTS = "packed_segments"


def packed_segments(position_ids: torch.Tensor) -> list[list[int]]:
    """Per row of a packed micro-batch, the lengths of its segments: its examples, then the padding at its end,
    each starting where the position ids start again at 0 (data.collate_packed numbers them so)."""
    rows, width = position_ids.shape
    starts: list[list[int]] = [[] for _ in range(rows)]
    for row, column in (position_ids == 0).nonzero().tolist():
        starts[row].append(column)
    return [[end - start for start, end in zip(row, [*row[1:], width], strict=True)] for row in starts]


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query [batch, heads, T, dim], key and value [batch, kv heads, T, dim];
    the output [batch, T, heads, dim]. With `packed_segments` (one list of lengths per row, summing to T), causal
    attention within each segment; otherwise transformers' SDPA with `attention_mask`."""
    segments = kwargs.pop(PACKED_SEGMENTS, None)
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    groups = int(getattr(module, "num_key_value_groups", 1))
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    rows = []
    for row, lengths in enumerate(segments):
        parts, at = [], 0
        for length in lengths:
            window = slice(at, at + length)
            parts.append(
                F.scaled_dot_product_attention(
                    query[row : row + 1, :, window],
                    key[row : row + 1, :, window],
                    value[row : row + 1, :, window],
                    dropout_p=dropout,
                    scale=scaling,
                    is_causal=True,
                )
            )
            at += length
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


ALL_ATTENTION_FUNCTIONS["sdpa"] = attention_forward
