"""The key/value cache of a running batch: one row per sequence, rows joining and leaving between steps.

Rows are left-padded to a common length, as transformers expects with an attention mask: a sequence that joins
the batch brings the cache of its own prefill (computed alone), which is padded on the left to the batch's length
(or the batch to its length) and stacked under the others; a sequence that leaves takes its row with it, and
columns no remaining row uses are cut from the left. Each layer's keys and values live in a buffer with room to
grow, so a decoding step writes one column in place instead of copying the whole cache (transformers'
`DynamicCache` concatenates at every step).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from transformers.cache_utils import Cache, DynamicLayer

if TYPE_CHECKING:
    import torch

# Columns a buffer grows by when it is full (at least; a quarter of its length for long sequences).
GROW_COLUMNS = 64


class _GrowingLayer(DynamicLayer):
    """One layer's keys and values: `[rows, heads, capacity, head_dim]` buffers, the first `length` columns used."""

    def __init__(self) -> None:
        super().__init__()
        self.length = 0
        self.key_buffer: Any = None
        self.value_buffer: Any = None

    def _reserve(self, like: torch.Tensor, columns: int) -> None:
        import torch

        if self.key_buffer is not None and columns <= self.key_buffer.shape[-2]:
            return
        capacity = columns + max(GROW_COLUMNS, columns // 4)
        shape = (*like.shape[:-2], capacity, like.shape[-1])
        keys = torch.zeros(shape, dtype=like.dtype, device=like.device)
        values = torch.zeros(shape, dtype=like.dtype, device=like.device)
        if self.key_buffer is not None and self.length:
            keys[..., : self.length, :] = self.key_buffer[..., : self.length, :]
            values[..., : self.length, :] = self.value_buffer[..., : self.length, :]
        self.key_buffer, self.value_buffer = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self.is_initialized:
            self.device = key_states.device
            self.is_initialized = True
        new = key_states.shape[-2]
        self._reserve(key_states, self.length + new)
        self.key_buffer[..., self.length : self.length + new, :] = key_states
        self.value_buffer[..., self.length : self.length + new, :] = value_states
        self.length += new
        self.keys = self.key_buffer[..., : self.length, :]
        self.values = self.value_buffer[..., : self.length, :]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold exactly these keys and values (with room to grow)."""
        self.key_buffer = self.value_buffer = None
        self.length = 0
        self.is_initialized = False
        self.update(keys, values)


class BatchKVCache(Cache):
    """A transformers `Cache` for a batch whose rows come and go (see the module's docstring)."""

    def __init__(self) -> None:
        super().__init__(layer_class_to_replicate=_GrowingLayer)

    @classmethod
    def holding(cls, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> BatchKVCache:
        """A cache that starts with these keys and values per layer (a prefix-tuning adapter's prefix)."""
        cache = cls()
        for keys, values in layers:
            layer = _GrowingLayer()
            layer.replace(keys, values)
            cache.layers.append(layer)
        return cache

    def growing(self) -> list[_GrowingLayer]:
        return [layer for layer in self.layers if isinstance(layer, _GrowingLayer)]

    @property
    def length(self) -> int:
        return self.growing()[0].length if self.layers else 0

    def keep_rows(self, rows: torch.Tensor, drop_columns: int = 0) -> None:
        """Keep only these rows (an index tensor), without the first `drop_columns` columns (padding for all)."""
        for layer in self.growing():
            used = slice(drop_columns, layer.length)
            layer.replace(
                layer.key_buffer[rows][..., used, :].contiguous(), layer.value_buffer[rows][..., used, :].contiguous()
            )

    def append_rows(self, other: BatchKVCache) -> None:
        """Stack `other`'s rows under this cache's, left-padding whichever is shorter to the other's length."""
        import torch
        import torch.nn.functional as F

        length = max(self.length, other.length)
        for mine, theirs in zip(self.growing(), other.growing(), strict=True):
            keys, values = [], []
            for layer in (mine, theirs):
                pad = (0, 0, length - layer.length, 0)  # left-pad the column dimension
                keys.append(F.pad(layer.key_buffer[..., : layer.length, :], pad))
                values.append(F.pad(layer.value_buffer[..., : layer.length, :], pad))
            mine.replace(torch.cat(keys), torch.cat(values))
