"""The batch runner: each lane's rows through their model, a prefill for the rows that join and one decoding step
for all of them at once, each row with its own adapter, sampling and stop rules.

A lane is a model and the rows decoding through it, with their KV cache and attention mask: the base model's lane
serves requests without an adapter and every adapter the base model's hooks apply per row (LoRA, IA3, soft prompt,
prefix); an adapter with a model of its own (a weight delta's copy) has a lane of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from app.ml.device import Placement
from app.ml.serving.kinds import Servable
from app.ml.serving.layers import BatchAdapters, plan_rows
from app.ml.serving.logits import RowProcessor
from app.ml.serving.output import Row, emit, finish_row, sample
from app.ml.serving.requests import Generation
from app.ml.serving.sampling import Sampler

if TYPE_CHECKING:
    import torch

    from app.ml.serving.kv_cache import BatchKVCache
    from app.ml.serving.residency import Base


@dataclass
class Lane:
    """A model and the rows decoding through it, with their KV cache and attention mask."""

    model: Any
    hooks: BatchAdapters | None  # the base model's per-row adapter hooks; None for a model of an adapter's own
    rows: list[Row] = field(default_factory=list)
    cache: BatchKVCache | None = None
    mask: Any = None  # [rows, columns] 1 where a row has a token, 0 for left padding
    plan: dict[str, Any] | None = None  # the hooks' plan for these rows (rebuilt when rows change)


def lane_key(servable: Servable | None) -> str | None:
    """The lane a request runs in: its adapter's own (a model of its own), or the base model's (None)."""
    return servable.ref.id if servable is not None and servable.own_model is not None else None


class BatchRunner:
    """Runs prefills and decoding steps on the engine thread."""

    def __init__(self, placement: Placement) -> None:
        self.placement = placement
        self.steps = 0  # decoding steps taken (all lanes)

    def prefill(self, base: Base, key: str | None, items: list[tuple[Generation, Servable | None]]) -> None:
        """Run the prompts through the model (one with virtual tokens alone; plain prompts together, left-padded),
        take each row's first token, and add the rows that go on, with their KV cache, to the lane's batch."""
        import torch

        from app.ml.serving.kv_cache import BatchKVCache  # transformers: only once the engine runs

        device = self.placement.device
        first = items[0][1]
        model: Any = first.own_model if key is not None and first is not None else base.plain
        kwargs: dict[str, Any] = {"use_cache": True}
        cache = BatchKVCache()
        prompts = [generation.request.input_ids for generation, _ in items]
        if first is not None and first.virtual_tokens:
            assert len(items) == 1
            inputs = first.prefill_inputs(model, torch.tensor(prompts, dtype=torch.long, device=device))
            kwargs.update(inputs.kwargs)
            cache = inputs.cache or cache
            lengths = [first.virtual_tokens + len(prompts[0])]
            kwargs["position_ids"] = torch.arange(inputs.start, lengths[0], device=device)[None]
            mask = torch.ones((1, lengths[0]), dtype=torch.long, device=device)
        else:
            lengths = [len(prompt) for prompt in prompts]
            width = max(lengths)
            pads = [width - n for n in lengths]
            kwargs["input_ids"] = torch.tensor(
                [[0] * pad + prompt for pad, prompt in zip(pads, prompts, strict=True)], dtype=torch.long, device=device
            )
            kwargs["position_ids"] = torch.tensor(
                [[0] * pad + list(range(n)) for pad, n in zip(pads, lengths, strict=True)], device=device
            )
            mask = torch.tensor([[0] * pad + [1] * n for pad, n in zip(pads, lengths, strict=True)], device=device)
        if base.takes_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        if key is None:
            layers = [servable.layers if servable else None for _, servable in items]
            base.hooks.plan = plan_rows(layers, device=device, dtype=self.placement.dtype)
        try:
            logits = model(**kwargs, attention_mask=mask, cache=cache).logits[:, -1, :]
        finally:
            base.hooks.plan = {}  # outside the engine's passes the base model is itself
        rows = [
            Row(
                generation=generation,
                servable=servable,
                sampler=Sampler(generation.request, device),
                processor=RowProcessor.of(generation.request, vocab=logits.shape[-1], device=logits.device),
                position=length,
                logprobs=[] if generation.request.logprobs is not None else None,
            )
            for (generation, servable), length in zip(items, lengths, strict=True)
        ]
        for row, token in zip(rows, sample(rows, logits, base.tokenizer), strict=True):
            emit(row, token, tokenizer=base.tokenizer, eos=base.eos)
        keep = [i for i, row in enumerate(rows) if row.finish_reason is None]
        if not keep:
            return
        if len(keep) < len(rows):
            mask = _keep_rows(cache, mask, keep)
        lane = base.lanes.get(key)
        if lane is None:
            lane = base.lanes[key] = Lane(model=model, hooks=base.hooks if key is None else None)
        if lane.cache is None or not lane.rows:
            lane.cache, lane.mask = cache, mask
        else:
            width = max(lane.mask.shape[1], mask.shape[1])
            lane.cache.append_rows(cache)
            lane.mask = torch.cat([_left_pad(lane.mask, width), _left_pad(mask, width)])
        lane.rows.extend(rows[i] for i in keep)
        lane.plan = None

    def step(self, base: Base, lane: Lane) -> None:
        """One decoding step for every row of the lane; finished and cancelled rows leave it at once."""
        import torch

        self.leave(lane, [row for row in lane.rows if row.generation.cancelled])
        if not lane.rows:
            return
        device = self.placement.device
        if lane.hooks is not None:
            if lane.plan is None:
                rows = [row.servable.layers if row.servable else None for row in lane.rows]
                lane.plan = plan_rows(rows, device=device, dtype=self.placement.dtype)
            lane.hooks.plan = lane.plan
        ids = torch.tensor([[row.last] for row in lane.rows], dtype=torch.long, device=device)
        positions = torch.tensor([[row.position] for row in lane.rows], dtype=torch.long, device=device)
        lane.mask = torch.cat([lane.mask, torch.ones((len(lane.rows), 1), dtype=lane.mask.dtype, device=device)], 1)
        try:
            logits = lane.model(
                input_ids=ids, position_ids=positions, attention_mask=lane.mask, cache=lane.cache, use_cache=True
            ).logits[:, -1, :]
        finally:
            base.hooks.plan = {}
        self.steps += 1
        tokens = sample(lane.rows, logits, base.tokenizer)
        for row, token in zip(lane.rows, tokens, strict=True):
            row.position += 1
            emit(row, token, tokenizer=base.tokenizer, eos=base.eos)
        self.leave(lane, [row for row in lane.rows if row.finish_reason is not None])

    @staticmethod
    def leave(lane: Lane, rows: list[Row]) -> None:
        """Take finished or cancelled rows out of the batch (and the columns no remaining row uses)."""
        if not rows:
            return
        for row in rows:
            if row.finish_reason is None:
                finish_row(row, "cancelled")
        keep = [i for i, row in enumerate(lane.rows) if row not in rows]
        lane.rows = [lane.rows[i] for i in keep]
        lane.plan = None
        if not keep:
            lane.cache, lane.mask = None, None
            return
        assert lane.cache is not None
        lane.mask = _keep_rows(lane.cache, lane.mask, keep)


def _keep_rows(cache: BatchKVCache, mask: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Keep these rows of a batch's cache, without the columns left of the first that any of them uses; returns
    their mask."""
    import torch

    index = torch.tensor(keep, dtype=torch.long, device=mask.device)
    mask = mask[index]
    used = mask.any(dim=0).nonzero()
    drop = int(used[0]) if len(used) else 0
    cache.keep_rows(index, drop_columns=drop)
    return mask[:, drop:]


def _left_pad(mask: torch.Tensor, width: int) -> torch.Tensor:
    import torch.nn.functional as F

    return F.pad(mask, (width - mask.shape[1], 0)) if mask.shape[1] < width else mask
