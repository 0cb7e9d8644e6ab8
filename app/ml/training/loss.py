"""The loss of one optimizer step, a micro-batch at a time: the forward and backward passes, the output layer
applied only where a loss is taken, and the step's loss and accuracy; then the step itself (`optimizer_step`),
for the recipe and for the runs a client steps (app/ml/training/stepwise.py)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from app.ml.device import Placement
from app.ml.formatting import IGNORE_INDEX, EncodedExample
from app.ml.training.data import collate, collate_packed, micro_batches, packed_micro_batches
from app.ml.training.parallel import ONE_PROCESS, OneProcess


@dataclass
class StepStats:
    """Sums over the loss-bearing tokens of one step (or one evaluation), gathered micro-batch by micro-batch."""

    loss_sum: float = 0.0
    correct: int = 0
    tokens: int = 0  # loss-bearing tokens
    input_tokens: int = 0  # real (non-pad) tokens fed to the model

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.tokens, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.tokens, 1)


def accumulate_gradients(
    model: nn.Module,
    examples: list[EncodedExample],
    *,
    pad_token_id: int,
    max_batch_tokens: int,
    placement: Placement | None = None,
    scaler: torch.amp.GradScaler | None = None,
    extra_positions: int = 0,
    pack: bool = False,
    parallel: OneProcess = ONE_PROCESS,
) -> StepStats:
    """Forward and backward passes of one optimizer step, one micro-batch under the token budget at a time.

    Each micro-batch's summed token loss is divided by the loss-bearing tokens of the whole step, so the
    accumulated gradients are those of the mean token loss over the step as one batch (what HF's loss
    computes), while only one micro-batch's activations and logits are alive at a time.

    With a half-precision `placement` the forward pass runs under autocast; `scaler` scales float16 losses.
    `extra_positions`: what the method adds to every row (virtual tokens), counted against max_batch_tokens.
    `pack`: several examples to a row, no padding between them (see `data.collate_packed`), and the output layer
    applied only where a loss is taken — the same loss and gradients, for less work and memory.
    `parallel`: this process's rank among several (app/ml/training/parallel.py): it takes its share of
    `examples` (the whole step's, on every rank), and the statistics returned are the whole step's.
    """
    return _micro_batch_passes(
        model,
        examples,
        pad_token_id,
        max_batch_tokens,
        placement=placement,
        scaler=scaler,
        backward=True,
        extra_positions=extra_positions,
        pack=pack,
        parallel=parallel,
    )


@torch.no_grad()
def evaluation_stats(
    model: nn.Module,
    examples: list[EncodedExample],
    *,
    pad_token_id: int,
    max_batch_tokens: int,
    placement: Placement | None = None,
    extra_positions: int = 0,
    pack: bool = False,
    parallel: OneProcess = ONE_PROCESS,
) -> StepStats:
    """Loss and accuracy over examples, with the same micro-batches (and memory bound) as training."""
    return _micro_batch_passes(
        model,
        examples,
        pad_token_id,
        max_batch_tokens,
        placement=placement,
        backward=False,
        extra_positions=extra_positions,
        pack=pack,
        parallel=parallel,
    )


def _micro_batch_passes(
    model: nn.Module,
    examples: list[EncodedExample],
    pad_token_id: int,
    max_batch_tokens: int,
    *,
    placement: Placement | None,
    backward: bool,
    scaler: torch.amp.GradScaler | None = None,
    extra_positions: int = 0,
    pack: bool = False,
    parallel: OneProcess = ONE_PROCESS,
) -> StepStats:
    device = next(model.parameters()).device
    autocast = placement.autocast() if placement is not None else contextlib.nullcontext()
    n_tokens = sum(e.n_loss_tokens for e in examples)  # of the whole step: each micro-batch's share of the mean
    # Summed on the device, read once at the end: no host synchronization per micro-batch.
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)

    def plan(group: list[EncodedExample]) -> list[Any]:
        if pack:
            return packed_micro_batches(group, max_batch_tokens)
        return micro_batches(group, max_batch_tokens, extra_positions)

    passes = parallel.micro_batches(examples, plan)
    scale = parallel.gradient_scale() / max(n_tokens, 1)
    for index, (group, weight) in enumerate(passes):
        batch = collate_packed(group, pad_token_id) if pack else collate(group, pad_token_id)
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
        with parallel.syncing(last=index == len(passes) - 1):
            with autocast:
                group_loss, group_correct = parallel.forward(model, _loss, batch, pack)
            if backward:
                share = group_loss * (scale * weight)
                (scaler.scale(share) if scaler is not None else share).backward()
        if weight:
            loss_sum += group_loss.detach()
            correct += group_correct
        del group_loss  # before the next micro-batch's forward pass
    if parallel.world_size > 1:
        totals = parallel.total(torch.stack([loss_sum.double(), correct.double()]))
        loss_sum, correct = totals[0], totals[1].long()
    return StepStats(
        loss_sum=float(loss_sum),
        correct=int(correct),
        tokens=n_tokens,
        input_tokens=sum(len(e.input_ids) for e in examples),
    )


def _loss(model: nn.Module, batch: dict[str, torch.Tensor], pack: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro-batch's summed token loss and how many of its loss-bearing tokens the model's argmax hits."""
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    targets = targets[mask]
    if pack:
        # The transformer without its output layer; then the output layer only where a loss is taken
        # (a fifth of the positions of a chat set, say), a chunk at a time: no logits for the others.
        hidden = model.get_decoder()(  # type: ignore[operator]
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).last_hidden_state
        head: nn.Module = model.get_output_embeddings()  # type: ignore[operator]
        return output_loss(head, hidden[:, :-1][mask], targets)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    # Prompt and p-tuning put their virtual tokens' positions first: the text's logits are the last.
    logits = logits[:, -batch["input_ids"].shape[1] :]
    # The loss-bearing positions, in float32 whatever the model's dtype; the full logits go now.
    scores = logits[:, :-1][mask].float()
    del logits
    return F.cross_entropy(scores, targets, reduction="sum"), (scores.detach().argmax(dim=-1) == targets).sum()


# Loss-bearing positions whose logits are alive at once: 256 x a 49k vocabulary is 50 MB in float32 (with its
# log-softmax and gradients, a few times that); the output layer's matrix product is still big enough to be fast.
LOSS_CHUNK_POSITIONS = 256


def output_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed cross-entropy of `head(hidden)` against `targets`, and how many argmaxes hit them, computed
    LOSS_CHUNK_POSITIONS positions at a time. Under autograd each chunk of several is checkpointed: its logits
    are freed after the forward pass and recomputed in the backward pass, so at most one chunk's logits (and
    their gradient) exist at a time, whatever the micro-batch; a single chunk is kept, not recomputed."""
    if hidden.shape[0] <= LOSS_CHUNK_POSITIONS:  # one chunk: nothing to free between chunks, nothing to recompute
        return _chunk_loss(head, hidden, targets)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    for start in range(0, hidden.shape[0], LOSS_CHUNK_POSITIONS):
        chunk, chunk_targets = (
            hidden[start : start + LOSS_CHUNK_POSITIONS],
            targets[start : start + LOSS_CHUNK_POSITIONS],
        )
        if torch.is_grad_enabled():
            chunk_loss, chunk_correct = checkpoint(_chunk_loss, head, chunk, chunk_targets, use_reentrant=False)
        else:
            chunk_loss, chunk_correct = _chunk_loss(head, chunk, chunk_targets)
        loss = loss + chunk_loss
        correct += chunk_correct
    return loss, correct


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scores = head(hidden).float()
    return F.cross_entropy(scores, targets, reduction="sum"), (scores.detach().argmax(dim=-1) == targets).sum()


# Architectures whose attention builds transformers' packed-sequence mask from position ids (and whose model has
# a decoder and an output layer to call apart): tested in tests/test_packing.py.
PACKING_ARCHITECTURES = frozenset({"llama", "qwen2", "gpt2", "gpt_neox", "phi"})


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    parameters: list[nn.Parameter],
    scaler: torch.amp.GradScaler,
    *,
    max_grad_norm: float,
    keep_gradients: bool = False,
) -> float | None:
    """The optimizer's step over the gradients accumulated since the last one, and the gradients cleared: unscaled
    first (float16's loss scaling; a step whose gradients overflowed is skipped and the scale lowered), clipped to
    `max_grad_norm` if it is positive. The gradients' norm before clipping, where they were clipped. With
    `keep_gradients` they are zeroed in place rather than freed (buffers that stay allocated)."""
    scaler.unscale_(optimizer)
    norm = None
    if max_grad_norm > 0:
        total = torch.nn.utils.clip_grad_norm_(parameters, max_norm=max_grad_norm)
        # Of sharded (FSDP2) gradients, a DTensor: the norm over every rank's shard.
        norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=not keep_gradients)
    return norm
