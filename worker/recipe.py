"""The training recipe every method shares: setup -> train (with per-epoch evaluation) -> export.

Modeled on torchtune's single-device recipes: a plain PyTorch loop, so every step can report metrics,
honour cancellation and stop requests, and checkpoint. Methods only decide what is trained and how it is saved.

The recipe's whole state (`state_dict` / `load_state_dict`: trainable weights, optimizer, scheduler, loss
scaler, RNG, the data position, the best evaluation so far) is what a checkpoint stores: a job resumed from one
continues exactly where the checkpoint was taken, and ends with the weights an uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from app.core.settings import Settings
from app.core.storage import ObjectStorage
from app.ml.device import Placement, PlacementError, resolve_placement
from app.ml.formatting import IGNORE_INDEX, EncodedExample
from app.ml.hyperparameters import TrainingHyperparameters
from app.ml.methods import METHODS
from app.ml.methods.base import BaseWeights, MethodContext, MethodUnavailable
from app.ml.registry import ModelRecord, ModelStore, ModelUnavailable, pad_token_id
from worker.data import Dataset, batches, collate, collate_packed, load_examples, micro_batches, packed_micro_batches
from worker.errors import TrainingError
from worker.lifecycle import ClaimedJob, Reporter, WorkerStopping, stop_requested

log = logging.getLogger(__name__)

_base_models: dict[tuple[str, str, Path, torch.dtype], nn.Module] = {}
_base_lock = threading.Lock()


def cached_base_model(models: ModelStore, record: ModelRecord, placement: Placement) -> nn.Module:
    """A private copy of the base model on the placement's device and in its dtype; the pristine one stays
    cached in host memory between jobs (one copy per worker, whatever the device).

    The copy's modules and parameters are its own, but on the cache's device (a CPU) its weights share the
    cached tensors: the base model is held once, not twice. Whatever a job trains gets its own tensors first
    (`own_trained_tensors`), so the cached weights are never changed."""
    with _base_lock:
        key = (record.id, record.revision, models.models_dir, placement.dtype)
        if key not in _base_models:
            _base_models.clear()  # one base model at a time: a worker that switches models does not hoard them
            cpu = Placement(device=torch.device("cpu"), dtype=placement.dtype, device_name="cpu")
            _base_models[key] = models.load(record, cpu)
        cached = _base_models[key]
        memo: dict[int, Any] = {id(p): nn.Parameter(p.data, requires_grad=p.requires_grad) for p in cached.parameters()}
        memo.update({id(b): b for b in cached.buffers()})  # never written (rotary frequencies)
        return copy.deepcopy(cached, memo).to(placement.device)


def own_trained_tensors(params: list[nn.Parameter]) -> None:
    """Give each parameter a job will update that still shares a cached base model's memory a copy of its own."""
    with _base_lock:
        cached = {p.untyped_storage().data_ptr() for model in _base_models.values() for p in model.parameters()}
    for param in params:
        if param.untyped_storage().data_ptr() in cached:
            param.data = param.data.clone()


def learning_rate_factor(total_steps: int, warmup_ratio: float, schedule: str) -> Callable[[int], float]:
    """The peak learning rate's multiplier at each step: a linear warmup from 0, then a linear or cosine decay
    to 0 at the last step."""
    warmup = int(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return factor


@dataclass
class EarlyStopping:
    """Tracks the best validation loss and a snapshot of the weights that reached it."""

    patience: int | None
    best: tuple[int, float, dict[str, torch.Tensor]] | None = None  # step, loss, trainable weights
    without_improvement: int = 0

    def observe(self, step: int, loss: float, snapshot: Callable[[], dict[str, torch.Tensor]]) -> None:
        if self.best is None or loss < self.best[1]:
            self.best = (step, loss, snapshot() if self.patience else {})  # a copy only when it may be restored
            self.without_improvement = 0
        else:
            self.without_improvement += 1

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.without_improvement >= self.patience


@dataclass
class Position:
    """Where training is: optimizer steps done, the epoch in progress and how many of its batches are done."""

    step: int = 0
    epoch: int = 1
    batches_done: int = 0
    evaluated_at: int = -1  # the step of the epoch's last evaluation
    metrics: dict[str, Any] = field(default_factory=dict)  # the last step's and evaluation's


class Checkpointer(Protocol):
    """Where a recipe saves its checkpoints (the worker: the object store and the job's checkpoint rows)."""

    def save(self, recipe: TrainingRecipe) -> None: ...


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
) -> StepStats:
    """Forward and backward passes of one optimizer step, one micro-batch under the token budget at a time.

    Each micro-batch's summed token loss is divided by the loss-bearing tokens of the whole step, so the
    accumulated gradients are those of the mean token loss over the step as one batch (what HF's loss
    computes), while only one micro-batch's activations and logits are alive at a time.

    With a half-precision `placement` the forward pass runs under autocast; `scaler` scales float16 losses.
    `extra_positions`: what the method adds to every row (virtual tokens), counted against max_batch_tokens.
    `pack`: several examples to a row, no padding between them (see `worker.data.collate_packed`), and the output
    layer applied only where a loss is taken — the same loss and gradients, for less work and memory.
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
) -> StepStats:
    device = next(model.parameters()).device
    autocast = placement.autocast() if placement is not None else contextlib.nullcontext()
    n_tokens = sum(e.n_loss_tokens for e in examples)  # of the whole step: each micro-batch's share of the mean
    # Summed on the device, read once at the end: no host synchronization per micro-batch.
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for batch in _collated_micro_batches(examples, pad_token_id, max_batch_tokens, extra_positions, pack):
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
        targets = batch["labels"][:, 1:]
        mask = targets != IGNORE_INDEX
        targets = targets[mask]
        with autocast:
            if pack:
                # The transformer without its output layer; then the output layer only where a loss is taken
                # (a fifth of the positions of a chat set, say), a chunk at a time: no logits for the others.
                hidden = model.get_decoder()(  # type: ignore[operator]
                    input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
                ).last_hidden_state
                head: nn.Module = model.get_output_embeddings()  # type: ignore[operator]
                group_loss, group_correct = output_loss(head, hidden[:, :-1][mask], targets)
                del hidden
            else:
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
                ).logits
                # Prompt and p-tuning put their virtual tokens' positions first: the text's logits are the last.
                logits = logits[:, -batch["input_ids"].shape[1] :]
                # The loss-bearing positions, in float32 whatever the model's dtype; the full logits go now.
                scores = logits[:, :-1][mask].float()
                del logits
                group_loss = F.cross_entropy(scores, targets, reduction="sum")
                group_correct = (scores.detach().argmax(dim=-1) == targets).sum()
                del scores
        if backward:
            share = group_loss / max(n_tokens, 1)
            (scaler.scale(share) if scaler is not None else share).backward()
        loss_sum += group_loss.detach()
        correct += group_correct
        del group_loss  # before the next micro-batch's forward pass
    return StepStats(
        loss_sum=float(loss_sum),
        correct=int(correct),
        tokens=n_tokens,
        input_tokens=sum(len(e.input_ids) for e in examples),
    )


# Bytes a token in flight holds per layer and hidden unit, in the model's dtype element size (saved activations
# of the attention and MLP blocks, and the allocator's slack): LoRA on SmolLM2-135M in float32 (30 layers x 576)
# measured about 1.9 MiB a token (bench/training.py --memory-job), which 32 x 30 x 576 x 4 bytes = 2.1 MiB covers.
ACTIVATION_BYTES_PER_LAYER_UNIT = 32
MEMORY_SHARE = 0.5  # of the device's free memory, for one micro-batch's activations
MIN_BATCH_TOKENS = 64
# On a CPU a micro-batch of 1024 tokens trains as many tokens a second as one of 2048 (bench/training.py: 63.7
# and 63.3 useful tokens/s for LoRA on SmolLM2-135M, 2 cores) for 1 GB less memory: the matrices are already
# big enough to keep the cores busy. A GPU gains from more, and takes the whole budget.
CPU_MICRO_BATCH_TOKENS = 1024


def micro_batch_budget(model: nn.Module, placement: Placement, limit: int, *, packed: bool = False) -> int:
    """The micro-batch token budget: the configured limit, or less where the device's free memory would not
    hold that many tokens' activations (a smaller machine, a bigger model), and for packed rows at most
    CPU_MICRO_BATCH_TOKENS on a CPU (padded micro-batches keep the limit: cut smaller, they pad more). An example
    longer than the budget (up to the limit, which the API checks) still trains, in a micro-batch of its own."""
    config = model.config  # type: ignore[union-attr]
    if packed and placement.device.type == "cpu":
        limit = min(limit, CPU_MICRO_BATCH_TOKENS)
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    if not (layers and hidden):
        return limit
    if placement.device.type == "cuda":
        free = torch.cuda.mem_get_info(placement.device)[0]
    else:
        free = psutil.virtual_memory().available
    element = torch.empty((), dtype=placement.dtype).element_size()
    per_token = ACTIVATION_BYTES_PER_LAYER_UNIT * layers * hidden * element
    return max(MIN_BATCH_TOKENS, min(limit, int(free * MEMORY_SHARE / per_token)))


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


_MALLOC_TRIM = _malloc_trim()


def return_freed_memory() -> None:
    """Give the host memory freed by a finished job back to the system (glibc keeps it otherwise, and an idle
    worker would hold its last job's peak). Not after every micro-batch: the next one would fault the pages
    back in, which made a step 30% slower on a CPU (measured with bench/training.py)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


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


def _collated_micro_batches(
    examples: list[EncodedExample], pad_token_id: int, max_batch_tokens: int, extra_positions: int, pack: bool
) -> Iterator[dict[str, torch.Tensor]]:
    if pack:
        for rows in packed_micro_batches(examples, max_batch_tokens):
            yield collate_packed(rows, pad_token_id)
    else:
        for group in micro_batches(examples, max_batch_tokens, extra_positions):
            yield collate(group, pad_token_id)


class TrainingRecipe:
    """One job's training, from its claimed row, base model record and a reporter: no HTTP, and no database
    unless the reporter writes to one (tests use an in-memory reporter)."""

    def __init__(
        self,
        settings: Settings,
        storage: ObjectStorage,
        job: ClaimedJob,
        model: ModelRecord,
        reporter: Reporter,
        checkpoints: Checkpointer | None = None,
    ) -> None:
        self.settings = settings
        self.checkpoints = checkpoints
        self.position = Position()
        self.stopping: EarlyStopping | None = None
        self.record = model
        self.storage = storage
        self.job = job
        self.reporter = reporter
        self.method = METHODS[job.method]
        self.hp: TrainingHyperparameters = self.method.hyperparameters.model_validate(job.hyperparameters)
        self.extra_positions = self.hp.reserved_positions()
        self.models = ModelStore(settings.models_dir, storage)

    # --- setup ----------------------------------------------------------------------------------
    def setup(self, resume: dict[str, Any] | None = None) -> None:
        """Load the data and the model and build the optimizer; with `resume` (a `state_dict`), continue from it."""
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        try:
            self.placement = resolve_placement(self.settings.device, self.settings.dtype)
        except PlacementError as exc:
            log.error("job %s: %s", self.job.id, exc)
            raise TrainingError(
                "the worker that took this job cannot use its configured device; the operator's worker log has "
                "the details",
                code="device_unavailable",
            ) from None
        record = self.record
        torch.manual_seed(self.hp.seed)
        try:
            self.tokenizer = self.models.tokenizer(record)
            self.pad_token_id = pad_token_id(self.tokenizer)
            self.train_data = self._load(self.job.training_file_key, "training")
            self.valid_data = (
                self._load(self.job.validation_file_key, "validation") if self.job.validation_file_key else None
            )
            if self.valid_data is None and self.hp.validation_split > 0:
                self.train_data, self.valid_data = self._hold_out(self.train_data)
            context = MethodContext(record=record, models=self.models, placement=self.placement)
            model = self.method.load_base(context) or cached_base_model(self.models, record, self.placement)
        except ModelUnavailable as exc:
            raise TrainingError(str(exc), code="model_unavailable") from None
        except MethodUnavailable as exc:
            raise TrainingError(str(exc), code="method_unavailable") from None
        self.reporter.placement(self.placement)
        self.model = self.method.prepare(model, self.hp, context)
        # Packed rows need the architecture's attention to keep examples apart by their position ids.
        self.pack = (
            self.method.packs_examples and self.extra_positions == 0 and record.architecture in PACKING_ARCHITECTURES
        )
        self.max_batch_tokens = micro_batch_budget(
            self.model, self.placement, self.settings.train_max_batch_tokens, packed=self.pack
        )
        self.model.train()
        groups = self.method.param_groups(self.model, self.hp)
        # Everything the optimizer may update over the job (a method can unfreeze more as it goes), by name.
        names = {id(param): name for name, param in self.model.named_parameters()}
        self.trained_names = {names[id(p)] for group in groups for p in group["params"]}
        self.trainable_params = [p for name, p in self.model.named_parameters() if name in self.trained_names]
        # Mixed precision: the frozen base computes in half precision, but what the optimizer updates stays
        # float32 (small updates vanish in bfloat16's 8-bit mantissa). PEFT already keeps adapters in float32.
        for param in self.trainable_params:
            if param.dtype != torch.float32:
                param.data = param.data.float()
        own_trained_tensors(self.trainable_params)
        # float16's narrow range underflows small gradients: scale the loss (bfloat16 has float32's range).
        self.scaler = torch.amp.GradScaler(self.placement.device.type, enabled=self.placement.dtype == torch.float16)
        trainable = sum(p.numel() for p in self.trainable_params)
        total = self.method.count_parameters(self.model)
        self.optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        self.examples_per_step = self.hp.batch_size * self.hp.gradient_accumulation_steps
        self.steps_per_epoch = self.hp.steps_per_epoch(len(self.train_data.examples))
        self.total_steps = self.steps_per_epoch * self.hp.n_epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, learning_rate_factor(self.total_steps, self.hp.warmup_ratio, self.hp.lr_scheduler)
        )
        if self.valid_data is not None:
            self.stopping = EarlyStopping(self.hp.early_stopping_patience)
        if resume is not None:
            self.load_state_dict(resume)
        self.last_checkpoint = time.monotonic()
        # In the job's metrics from the start (GET /jobs/{id}), and as an event.
        self.reporter.progress(
            step=self.position.step,
            total_steps=self.total_steps,
            epoch=self.position.epoch - 1,
            metrics={
                "trainable_parameters": trainable,
                "total_parameters": total,
                "trainable_share": round(trainable / total, 6),
                "train_examples": len(self.train_data.examples),
                "truncated_examples": self.train_data.n_truncated,
                "resumed_from_step": self.position.step,  # this attempt's first step is the one after
                "micro_batch_tokens": self.max_batch_tokens,
                "packed": self.pack,
            },
            message=f"{self.method.name} on {self.job.base_model}: {trainable:,} of {total:,} parameters trainable "
            f"({100 * trainable / total:.3f}%); {len(self.train_data.examples)} examples, {self.total_steps} steps; "
            f"micro-batches of up to {self.max_batch_tokens} tokens{', examples packed' if self.pack else ''}",
            type_="log",
        )

    def _hold_out(self, data: Dataset) -> tuple[Dataset, Dataset]:
        """A seeded random `validation_split` of the training examples (at least one) becomes the validation set."""
        share = self.hp.validation_split
        n = len(data.examples)
        n_valid = self.hp.held_out(n)
        if n - n_valid < 1:
            raise TrainingError(
                f"validation_split={share} leaves no training example out of {n}; lower it or add examples"
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.hp.seed)).tolist()
        held = set(order[:n_valid])
        train = [e for i, e in enumerate(data.examples) if i not in held]
        valid = [e for i, e in enumerate(data.examples) if i in held]
        self.reporter.event(
            "log", f"{n_valid} of {n} training examples held out for validation (validation_split={share})"
        )
        return dataclasses.replace(data, examples=train), dataclasses.replace(data, examples=valid)

    def _load(self, key: str, what: str) -> Dataset:
        data = load_examples(self.storage, key, self.tokenizer, self.hp.max_seq_length)
        if not data.examples:
            raise TrainingError(
                f"the {what} file has no example with a completion inside max_seq_length={self.hp.max_seq_length}"
            )
        if data.n_dropped:
            self.reporter.event(
                "log",
                f"{data.n_dropped} {what} example(s) skipped: nothing to learn within max_seq_length",
                level="warning",
            )
        return data

    # --- train -----------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Train for n_epochs (from where `setup(resume=...)` left off), evaluating every eval_every steps and at
        each epoch end, checkpointing every checkpoint_every steps and at each epoch end; with early stopping,
        stop after `early_stopping_patience` evaluations without a better validation loss and keep the best
        weights. A stop request (the worker shutting down) checkpoints and raises WorkerStopping."""
        at = self.position
        while at.epoch <= self.hp.n_epochs and not self._should_stop_early():
            self.model.train()
            order = batches(self.train_data.examples, self.examples_per_step, shuffle_seed=self.hp.seed + at.epoch)
            for index, step_examples in enumerate(order):
                if index < at.batches_done:  # trained before the checkpoint this run resumed from
                    continue
                self._train_step(step_examples)
                at.batches_done = index + 1
                if self.hp.eval_every and at.step % self.hp.eval_every == 0 and self.valid_data is not None:
                    at.metrics.update(self._evaluate_and_report(at.step, at.epoch, f"step {at.step}"))
                    at.evaluated_at = at.step
                if self._should_stop_early():
                    break
                if at.batches_done < self.steps_per_epoch:  # the epoch's end has its own checkpoint
                    self._checkpoint_if_due()
            if self.valid_data is not None and at.evaluated_at != at.step:
                at.metrics.update(self._evaluate_and_report(at.step, at.epoch, f"epoch {at.epoch}"))
            if not self._should_stop_early():
                at.epoch, at.batches_done, at.evaluated_at = at.epoch + 1, 0, -1
            self._checkpoint()
            self._stop_if_requested()
        if self.stopping is not None and self.stopping.best is not None and self.hp.early_stopping_patience:
            at.metrics.update(self._keep_best(at.step, min(at.epoch, self.hp.n_epochs)))
        return at.metrics

    def _should_stop_early(self) -> bool:
        return self.stopping is not None and self.stopping.should_stop

    def _train_step(self, step_examples: list[EncodedExample]) -> None:
        at = self.position
        change = self.method.before_step(
            self.model, self.hp, step=at.step, epoch=at.epoch, steps_per_epoch=self.steps_per_epoch
        )
        if change:
            self.reporter.event("log", f"step {at.step + 1}: {change}", {"step": at.step + 1})
        started = time.perf_counter()
        stats = accumulate_gradients(
            self.model,
            step_examples,
            pad_token_id=self.pad_token_id,
            max_batch_tokens=self.max_batch_tokens,
            placement=self.placement,
            scaler=self.scaler,
            extra_positions=self.extra_positions,
            pack=self.pack,
        )
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.trainable_params, max_norm=1.0)
        lr = self.scheduler.get_last_lr()[0]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        at.step += 1
        elapsed = time.perf_counter() - started
        trained_tokens = int(at.metrics.get("trained_tokens", 0)) + stats.input_tokens  # kept across a resume
        at.metrics = {
            "train_loss": round(stats.loss, 6),
            "train_token_accuracy": round(stats.accuracy, 6),
            "learning_rate": lr,
            "tokens_per_second": round(stats.input_tokens / max(elapsed, 1e-9), 1),
            "trained_tokens": trained_tokens,
        }
        self.reporter.progress(
            step=at.step,
            total_steps=self.total_steps,
            epoch=at.epoch,
            metrics=at.metrics,
            message=f"step {at.step}/{self.total_steps}: train loss {stats.loss:.4f}",
        )
        if at.step % self.settings.log_every_steps == 0 or at.step == self.total_steps:
            speed = at.metrics["tokens_per_second"]
            log.info(
                "job %s: step %d/%d, train loss %.4f, %.1f tokens/s",
                self.job.id,
                at.step,
                self.total_steps,
                stats.loss,
                speed,
                extra={
                    "step": at.step,
                    "total_steps": self.total_steps,
                    "loss": stats.loss,
                    "tokens_per_second": speed,
                },
            )

    def _checkpoint_if_due(self) -> None:
        every = self.hp.checkpoint_every
        overdue = time.monotonic() - self.last_checkpoint > 60 * self.settings.checkpoint_minutes
        if (every and self.position.step % every == 0) or overdue or stop_requested():
            self._checkpoint()
        self._stop_if_requested()

    def _checkpoint(self) -> None:
        if self.checkpoints is not None:
            self.checkpoints.save(self)
        self.last_checkpoint = time.monotonic()

    def _stop_if_requested(self) -> None:
        """The worker is shutting down: the step's checkpoint is saved, the job can go back to the queue."""
        if stop_requested():
            raise WorkerStopping(self.position.step)

    def _evaluate_and_report(self, step: int, epoch: int, when: str) -> dict[str, float]:
        assert self.valid_data is not None
        evaluation = self.evaluate(self.valid_data)
        if self.stopping is not None:
            self.stopping.observe(step, evaluation["valid_loss"], self.trainable_state)
        self.reporter.progress(
            step=step,
            total_steps=self.total_steps,
            epoch=epoch,
            metrics=evaluation,
            type_="eval",
            message=f"{when}: valid loss {evaluation['valid_loss']:.4f}, "
            f"perplexity {evaluation['valid_perplexity']:.2f}",
        )
        return evaluation

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """A copy of what the optimizer updates (the early-stopping snapshot), on the host."""
        return {
            name: param.detach().to("cpu", copy=True)
            for name, param in self.model.named_parameters()
            if name in self.trained_names
        }

    def _keep_best(self, step: int, epoch: int) -> dict[str, Any]:
        """Put the best evaluation's weights back and say so: they are what gets published."""
        stopping = self.stopping
        assert stopping is not None and stopping.best is not None
        best_step, best_loss, best_state = stopping.best
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name in best_state:
                    param.copy_(best_state[name])
        if stopping.should_stop:
            why = f"stopped early at step {step}: {stopping.patience} evaluation(s) without a lower validation loss"
        else:
            why = f"trained all {step} steps"
        summary = {"best_step": best_step, "best_valid_loss": best_loss, "stopped_early": stopping.should_stop}
        self.reporter.progress(
            step=step,
            total_steps=self.total_steps,
            epoch=epoch,
            metrics=summary,
            type_="early_stopping",
            message=f"{why}; publishing the weights of step {best_step} (valid loss {best_loss:.4f})",
        )
        return summary

    # --- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly from here (tensors on the host; loads with weights_only)."""
        at = self.position
        stopping, device = self.stopping, self.placement.device
        early_stopping = None
        if stopping is not None:
            best = list(stopping.best) if stopping.best else None
            early_stopping = {"best": best, "without_improvement": stopping.without_improvement}
        return {
            "position": {
                "step": at.step,
                "epoch": at.epoch,
                "batches_done": at.batches_done,
                "evaluated_at": at.evaluated_at,
            },
            "metrics": dict(at.metrics),
            "trainable": self.trainable_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {
                "cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            },
            "early_stopping": early_stopping,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict` of the same job (after `setup` has built the model and optimizer)."""
        self.position = Position(**state["position"], metrics=dict(state["metrics"]))
        trainable = state["trainable"]
        missing = self.trained_names - set(trainable)
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} trained tensors, e.g. {sorted(missing)[0]}")
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name in trainable:
                    param.copy_(trainable[name])
        # A method that unfreezes as it goes (layerwise) unfreezes what it had by then, before the optimizer
        # state of those parameters is matched to them.
        self.method.before_step(
            self.model,
            self.hp,
            step=self.position.step,
            epoch=self.position.epoch,
            steps_per_epoch=self.steps_per_epoch,
        )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["cpu"])
        if state["rng"]["cuda"] is not None and self.placement.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.placement.device)
        saved = state["early_stopping"]
        if saved is not None and self.stopping is not None:
            best = saved["best"]
            self.stopping.best = (int(best[0]), float(best[1]), dict(best[2])) if best else None
            self.stopping.without_improvement = int(saved["without_improvement"])

    @torch.no_grad()
    def evaluate(self, data: Dataset) -> dict[str, float]:
        self.model.eval()
        stats = evaluation_stats(
            self.model,
            data.examples,
            pad_token_id=self.pad_token_id,
            max_batch_tokens=self.max_batch_tokens,
            placement=self.placement,
            extra_positions=self.extra_positions,
            pack=self.pack,
        )
        self.model.train()
        return {
            "valid_loss": round(stats.loss, 6),
            "valid_perplexity": round(math.exp(min(stats.loss, 50.0)), 4),
            "valid_token_accuracy": round(stats.accuracy, 6),
        }

    # --- export ----------------------------------------------------------------------------------
    def export(self, folder: Path) -> None:
        """Write the method's artifact; a checkpoint's export mid-training leaves the model in training mode."""
        training = self.model.training
        self.model.eval()
        try:
            self.method.export(self.model, folder, self.base_weights())
        finally:
            self.model.train(training)

    def base_weights(self) -> BaseWeights:
        return BaseWeights(record=self.record, weights_sha256=self.models.weights_sha256(self.record))
