"""Direct preference optimization (Rafailov et al., 2023): the sigmoid loss as TRL's `DPOTrainer` computes it, over
the summed log-probabilities of each output's tokens under the policy and under a reference policy.

The reference costs no second model: for an adapter (PEFT) method it is the same model with the adapter switched
off (`disable_adapter()`, no gradients); otherwise (weight-delta methods, and a job that starts from fine-tuned
weights, whose reference is those weights) its log-probabilities are computed once before the first step, as
TRL's `precompute_ref_log_probs` does, kept with the pairs and in the recipe's checkpoints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from app.ml.device import Placement
from app.ml.formatting import IGNORE_INDEX
from app.ml.training.loss import LOSS_CHUNK_POSITIONS
from app.ml.training.preference import PreferencePair, collate_pairs, pair_micro_batches


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair: the sigmoid DPO loss `-log σ(β((π_c − ref_c) − (π_r − ref_r)))`, and the implicit rewards of the
    chosen and rejected outputs, `β(π − ref)` (detached: metrics)."""
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def _token_log_probs(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(head(hidden).float(), targets, reduction="none")


def token_log_probs(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The log-probability of each target the model predicts at the positions `mask` selects (`targets` and
    `mask` [rows, positions of the input]; flat, in the mask's row-major order, float32).

    The transformer runs without its output layer; the output layer is applied only at the selected positions,
    LOSS_CHUNK_POSITIONS at a time (checkpointed under autograd): no logits elsewhere, at most one chunk's alive at
    once, whatever the batch (the training recipe's loss does the same: app/ml/training/loss.py)."""
    hidden = model.get_decoder()(  # type: ignore[operator]
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state[mask]
    picked = targets[mask]
    head: nn.Module = model.get_output_embeddings()  # type: ignore[operator]
    pieces = []
    for start in range(0, hidden.shape[0], LOSS_CHUNK_POSITIONS):
        chunk, chunk_targets = (
            hidden[start : start + LOSS_CHUNK_POSITIONS],
            picked[start : start + LOSS_CHUNK_POSITIONS],
        )
        if torch.is_grad_enabled() and hidden.shape[0] > LOSS_CHUNK_POSITIONS:
            pieces.append(checkpoint(_token_log_probs, head, chunk, chunk_targets, use_reentrant=False))
        else:
            pieces.append(_token_log_probs(head, chunk, chunk_targets))
    return torch.cat(pieces) if pieces else torch.zeros(0, device=input_ids.device)


def sequence_log_probs(model: nn.Module, batch: dict[str, torch.Tensor], *, split_head: bool) -> torch.Tensor:
    """Each row's summed log-probability of its label tokens (the output), in float32.

    `split_head`: `token_log_probs` (no logits for the prompt). Otherwise the whole model (methods that put
    virtual tokens first), with the labelled positions' logits taken from its output."""
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    rows = mask.nonzero()[:, 0]
    if split_head:  # the last position predicts nothing here: a column of no target after the others
        pad = torch.zeros_like(mask[:, :1])
        token_logps = token_log_probs(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            torch.cat([targets, pad.long()], dim=1),
            torch.cat([mask, pad], dim=1),
        )
    else:
        picked = targets[mask]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        # Prompt and p-tuning put their virtual tokens' positions first: the text's logits are the last.
        scores = logits[:, -batch["input_ids"].shape[1] :][:, :-1][mask].float()
        del logits
        token_logps = -F.cross_entropy(scores, picked, reduction="none")
    sums = torch.zeros(targets.shape[0], dtype=torch.float32, device=token_logps.device)
    return sums.index_add(0, rows, token_logps)


@dataclass
class PreferenceStats:
    """Sums over the pairs of one step (or one evaluation), gathered micro-batch by micro-batch."""

    loss_sum: float = 0.0
    chosen_reward_sum: float = 0.0
    rejected_reward_sum: float = 0.0
    correct: int = 0  # pairs whose chosen reward is above the rejected one's
    pairs: int = 0
    input_tokens: int = 0

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.pairs, 1)

    def metrics(self, prefix: str) -> dict[str, float]:
        """TRL's metrics (`loss`, `rewards/chosen`, …) under the job's names: `train_rewards_chosen`, …"""
        n = max(self.pairs, 1)
        chosen, rejected = self.chosen_reward_sum / n, self.rejected_reward_sum / n
        return {
            f"{prefix}_loss": round(self.loss, 6),
            f"{prefix}_rewards_chosen": round(chosen, 6),
            f"{prefix}_rewards_rejected": round(rejected, 6),
            f"{prefix}_rewards_margins": round(chosen - rejected, 6),
            f"{prefix}_rewards_accuracies": round(self.correct / n, 6),
        }


def _on(device: torch.device, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.to(device) for name, tensor in batch.items()}


def _adapter_off(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    return model.disable_adapter()  # type: ignore[operator, no-any-return]


def preference_passes(
    model: nn.Module,
    pairs: list[PreferencePair],
    *,
    beta: float,
    pad_token_id: int,
    max_batch_tokens: int,
    split_head: bool,
    placement: Placement | None = None,
    scaler: torch.amp.GradScaler | None = None,
    backward: bool = True,
    extra_positions: int = 0,
) -> PreferenceStats:
    """Forward (and, with `backward`, backward) passes of one step's pairs, one micro-batch under the token budget
    at a time. Each micro-batch's summed pair losses are divided by the pairs of the whole step: the gradients are
    those of the mean loss over the step as one batch. A pair without a precomputed reference gets it from the
    model with its adapter off, in the same micro-batch, without gradients."""
    device = next(model.parameters()).device
    autocast = placement.autocast() if placement is not None else contextlib.nullcontext()
    totals = [torch.zeros((), dtype=torch.float32, device=device) for _ in range(3)]
    correct = torch.zeros((), dtype=torch.long, device=device)
    for group in pair_micro_batches(pairs, max_batch_tokens, extra_positions):
        batch = _on(device, collate_pairs(group, pad_token_id))
        reference = _reference(model, group, batch, split_head=split_head, autocast=autocast)
        with autocast:
            logps = sequence_log_probs(model, batch, split_head=split_head)
        chosen, rejected = logps.chunk(2)
        losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, reference[0], reference[1], beta)
        if backward:
            share = losses.sum() / len(pairs)
            (scaler.scale(share) if scaler is not None else share).backward()
        for total, value in zip(totals, (losses.detach(), chosen_rewards, rejected_rewards), strict=True):
            total += value.sum()
        correct += (chosen_rewards > rejected_rewards).sum()
        del losses, logps, batch
    loss_sum, chosen_sum, rejected_sum = (float(total) for total in totals)
    return PreferenceStats(
        loss_sum=loss_sum,
        chosen_reward_sum=chosen_sum,
        rejected_reward_sum=rejected_sum,
        correct=int(correct),
        pairs=len(pairs),
        input_tokens=sum(p.n_tokens for p in pairs),
    )


def _reference(
    model: nn.Module,
    group: list[PreferencePair],
    batch: dict[str, torch.Tensor],
    *,
    split_head: bool,
    autocast: contextlib.AbstractContextManager[object],
) -> tuple[torch.Tensor, torch.Tensor]:
    device = batch["input_ids"].device
    if all(p.reference is not None for p in group):
        values = torch.tensor([p.reference for p in group], dtype=torch.float32, device=device)
        return values[:, 0], values[:, 1]
    with torch.no_grad(), _adapter_off(model), autocast:
        logps = sequence_log_probs(model, batch, split_head=split_head)
    chosen, rejected = logps.chunk(2)
    return chosen, rejected


@torch.no_grad()
def precompute_reference(
    model: nn.Module,
    pairs: list[PreferencePair],
    *,
    pad_token_id: int,
    max_batch_tokens: int,
    split_head: bool,
    placement: Placement | None = None,
    extra_positions: int = 0,
) -> None:
    """Each pair's reference log-probabilities from `model` as it is now (before training), kept on the pair."""
    device = next(model.parameters()).device
    autocast = placement.autocast() if placement is not None else contextlib.nullcontext()
    for group in pair_micro_batches(pairs, max_batch_tokens, extra_positions):
        batch = _on(device, collate_pairs(group, pad_token_id))
        with autocast:
            chosen, rejected = sequence_log_probs(model, batch, split_head=split_head).chunk(2)
        for pair, c, r in zip(group, chosen.tolist(), rejected.tolist(), strict=True):
            pair.reference = (c, r)


def reference_table(pairs: list[PreferencePair]) -> torch.Tensor | None:
    """The pairs' precomputed reference log-probabilities as an (n, 2) float64 tensor (a checkpoint keeps it)."""
    if not pairs or any(p.reference is None for p in pairs):
        return None
    return torch.tensor([p.reference for p in pairs], dtype=torch.float64)


def set_references(pairs: list[PreferencePair], table: torch.Tensor) -> None:
    if table.shape != (len(pairs), 2):
        raise ValueError(
            f"the checkpoint's reference log-probabilities are for {table.shape[0]} pairs, not {len(pairs)}"
        )
    for pair, (chosen, rejected) in zip(pairs, table.tolist(), strict=True):
        pair.reference = (chosen, rejected)


def without_dropout(model: nn.Module) -> Iterator[str]:
    """Switch every dropout of the model off (TRL's `disable_dropout`, its DPO default): the policy's log-probs are
    then comparable with the reference's, which runs without it. Yields the names of those it switched off."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            module.p = 0.0
            yield name
