"""The training recipe every method shares: setup -> train (with per-epoch evaluation) -> export.

Modeled on torchtune's single-device recipes: a plain PyTorch loop, so every step can report metrics, honour
cancellation and stop requests, and checkpoint. Methods only decide what is trained and how it is saved. It runs
from anything that hands it a base model, a tokenizer, records, hyperparameters and a reporter: the worker adapts
a claimed job to it (worker/training.py); a test or a script reports in memory.

The recipe's whole state (`state_dict`, which `setup(resume=...)` continues from: trainable weights, optimizer,
scheduler, loss scaler, RNG, the data position, the best evaluation so far) is what a checkpoint stores: a run
resumed from one continues exactly where the checkpoint was taken, and ends with the weights an uninterrupted run
would have. Across several ranks (app/ml/training/parallel.py) the state is the same, gathered whole: it resumes
on any number of ranks.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.ml.hyperparameters import TrainingHyperparameters
from app.ml.methods.base import BaseWeights, FineTuningMethod, MethodContext, StartWeightsMismatch
from app.ml.models import pad_token_id
from app.ml.objectives import SFT
from app.ml.training.base_models import own_trained_tensors
from app.ml.training.data import Dataset, batches
from app.ml.training.loss import PACKING_ARCHITECTURES, optimizer_step
from app.ml.training.memory import micro_batch_budget
from app.ml.training.objectives import objective_for
from app.ml.training.parallel import ONE_PROCESS, OneProcess
from app.ml.training.protocols import Checkpointer, Reporter, StopRequested, StopSignal, TrainingError, never
from app.ml.training.schedule import EarlyStopping, learning_rate_factor

log = logging.getLogger(__name__)

MAX_GRAD_NORM = 1.0  # every step's gradients clipped to this norm


@dataclass(frozen=True)
class RecipeLimits:
    """What the operator bounds (the worker passes its settings: TUNEFORGE_TRAIN_MAX_BATCH_TOKENS, ...)."""

    max_batch_tokens: int  # a micro-batch's token budget, before the device's free memory lowers it
    checkpoint_minutes: float  # a checkpoint at least this often, besides checkpoint_every and each epoch's end
    log_every_steps: int  # a progress line in the log every this many steps


@dataclass
class Position:
    """Where training is: optimizer steps done, the epoch in progress and how many of its batches are done."""

    step: int = 0
    epoch: int = 1
    batches_done: int = 0
    evaluated_at: int = -1  # the step of the epoch's last evaluation
    metrics: dict[str, Any] = field(default_factory=dict)  # the last step's and evaluation's


class TrainingRecipe:
    """One run of `method` over a base model: records in, an artifact out, progress to `reporter`."""

    def __init__(
        self,
        method: FineTuningMethod,
        hyperparameters: TrainingHyperparameters,
        *,
        model: nn.Module,
        tokenizer: Any,
        context: MethodContext,
        train: Iterable[dict[str, Any]],
        valid: Iterable[dict[str, Any]] | None,
        reporter: Reporter,
        limits: RecipeLimits,
        stop: StopSignal = never,
        checkpointer: Checkpointer | None = None,
        name: str = "training",
        objective: str = SFT,
        start_from: Path | None = None,
        parallel: OneProcess = ONE_PROCESS,
        prune: Callable[[int, float], bool] | None = None,
        evaluate_at: Collection[int] = (),
    ) -> None:
        """`model`: the base model to train, on `context.placement`'s device and in its dtype (see
        `training_base_model`); `train` and `valid`: records as in a training file (chat or prompt/completion;
        preference lines for `objective` "dpo"); `name`: how log lines name the run (the worker: the job id);
        `start_from`: a folder holding an artifact of the same method on the same base model (an adapter or a
        checkpoint), whose weights training starts from; `parallel`: this process's share of the run when it is one
        rank of several (app/ml/training/parallel.py); every rank builds the same recipe, and only rank 0's
        reporter and checkpointer write anything (the others' take part in what is gathered from all ranks);
        `prune(step, valid_loss)`, asked after each evaluation (rank 0's answer counts): True stops training there,
        as early stopping does, and what has been trained is published (a sweep's successive halving);
        `evaluate_at`: steps evaluated besides every `eval_every` (a sweep's rungs)."""
        self.method = method
        self.hp = hyperparameters
        self.base_model = model
        self.tokenizer = tokenizer
        self.context = context
        self.record = context.record
        self.placement = context.placement
        self.train_records = train
        self.valid_records = valid
        self.reporter = reporter
        self.limits = limits
        self.stop = stop
        self.checkpoints = checkpointer
        self.name = name
        self.position = Position()
        self.stopping: EarlyStopping | None = None
        self.prune = prune
        self.pruned = False
        self.evaluate_at = frozenset(evaluate_at)
        self.extra_positions = self.hp.reserved_positions()
        self.start_from = start_from
        # DPO's reference is the model before its first step: the base with the adapter off, unless the method has
        # no adapter to switch off or the run starts from trained weights (then computed once, before training).
        self.objective = objective_for(
            objective, hyperparameters, precomputed_reference=method.artifact_format != "peft" or bool(start_from)
        )
        self.parallel = parallel
        if parallel.world_size > 1 and not self.objective.data_parallel:
            raise TrainingError(f"the {objective} objective trains on one device; create the job with 1 device")

    # --- setup ----------------------------------------------------------------------------------
    def setup(self, resume: dict[str, Any] | None = None) -> None:
        """Encode the data, prepare the model and build the optimizer; with `resume` (a `state_dict`), continue
        from it (rank 0's, where there are several ranks)."""
        resume = self.parallel.share(resume)
        torch.manual_seed(self.hp.seed)
        self.pad_token_id = pad_token_id(self.tokenizer)
        self.train_data = self._encode(self.train_records, "training")
        self.valid_data = self._encode(self.valid_records, "validation") if self.valid_records is not None else None
        if self.valid_data is None and self.hp.validation_split > 0:
            self.train_data, self.valid_data = self._hold_out(self.train_data)
        self.reporter.placement(self.placement)
        self.model = self.method.prepare(self.base_model, self.hp, self.context)
        if self.start_from is not None:
            try:
                self.method.load_weights(self.model, self.start_from, self.context)
            except StartWeightsMismatch as exc:
                raise TrainingError(f"the fine-tuned model this job continues from cannot be loaded: {exc}") from None
        self.objective.prepare(self)
        # Packed rows need the architecture's attention to keep examples apart by their position ids; the same
        # architectures let the output layer run apart from the transformer, only where a loss is taken.
        self.split_head = (
            self.method.packs_examples
            and self.extra_positions == 0
            and self.record.architecture in PACKING_ARCHITECTURES
        )
        self.pack = self.split_head and self.objective.packs_examples
        self.model.train()
        groups = self.method.param_groups(self.model, self.hp)
        # Everything the optimizer may update over the job (a method can unfreeze more as it goes), by name.
        names = {id(param): name for name, param in self.model.named_parameters()}
        self.trained_names = {names[id(p)] for group in groups for p in group["params"]}
        trained = [p for name, p in self.model.named_parameters() if name in self.trained_names]
        # Mixed precision: the frozen base computes in half precision, but what the optimizer updates stays
        # float32 (small updates vanish in bfloat16's 8-bit mantissa). PEFT already keeps adapters in float32.
        for param in trained:
            if param.dtype != torch.float32:
                param.data = param.data.float()
        own_trained_tensors(trained)
        trainable = sum(p.numel() for p in trained)
        total = self.method.count_parameters(self.model)
        self.examples_per_step = self.hp.batch_size * self.hp.gradient_accumulation_steps
        self.steps_per_epoch = self.hp.steps_per_epoch(len(self.train_data.examples))
        self.total_steps = self.steps_per_epoch * self.hp.n_epochs
        if resume is not None:
            self._load_weights(resume)
        # Data parallel from here (sharded, the parameters are new objects): the optimizer is built over them.
        self.parallel.wrap(self.model)
        # What the device holds once the model is on it; of several ranks, the least: every rank must cut a step
        # into micro-batches the same way (their collectives pair up).
        self.max_batch_tokens = self.parallel.least(
            micro_batch_budget(
                self.model, self.placement, self.limits.max_batch_tokens, packed=self.pack or self.objective.pads_little
            )
        )
        groups = self.method.param_groups(self.model, self.hp)
        self.trainable_params = [p for name, p in self.model.named_parameters() if name in self.trained_names]
        # float16's narrow range underflows small gradients: scale the loss (bfloat16 has float32's range).
        self.scaler = torch.amp.GradScaler(self.placement.device.type, enabled=self.placement.dtype == torch.float16)
        self.optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, learning_rate_factor(self.total_steps, self.hp.warmup_ratio, self.hp.lr_scheduler)
        )
        if self.valid_data is not None:
            self.stopping = EarlyStopping(self.hp.early_stopping_patience)
        if resume is not None:
            self._load_training_state(resume)
        self.objective.start(self)
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
                "ranks": self.parallel.world_size,
            },
            message=f"{self.method.name} on {self.record.id}: {trainable:,} of {total:,} parameters trainable "
            f"({100 * trainable / total:.3f}%); {len(self.train_data.examples)} examples, {self.total_steps} steps; "
            f"micro-batches of up to {self.max_batch_tokens} tokens{', examples packed' if self.pack else ''}"
            + (f"; {self.parallel.describe()}" if self.parallel.distributed else ""),
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

    def _encode(self, records: Iterable[dict[str, Any]], what: str) -> Dataset:
        data: Dataset = self.objective.encode(records, self.tokenizer, self.hp.max_seq_length)
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
        weights. A stop request (the stop signal) checkpoints and raises StopRequested."""
        at = self.position
        while at.epoch <= self.hp.n_epochs and not self._should_stop_early():
            self.model.train()
            order = batches(self.train_data.examples, self.examples_per_step, shuffle_seed=self.hp.seed + at.epoch)
            for index, step_examples in enumerate(order):
                if index < at.batches_done:  # trained before the checkpoint this run resumed from
                    continue
                self._train_step(step_examples)
                at.batches_done = index + 1
                due = bool(self.hp.eval_every and at.step % self.hp.eval_every == 0) or at.step in self.evaluate_at
                if due and self.valid_data is not None:
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
        return self.pruned or (self.stopping is not None and self.stopping.should_stop)

    def _train_step(self, step_examples: list[Any]) -> None:
        at = self.position
        change = self.method.before_step(
            self.model, self.hp, step=at.step, epoch=at.epoch, steps_per_epoch=self.steps_per_epoch
        )
        if change:
            self.parallel.rewrap(self.model)
            self.reporter.event("log", f"step {at.step + 1}: {change}", {"step": at.step + 1})
        started = time.perf_counter()
        stats = self.objective.step(self, step_examples)
        lr = self.scheduler.get_last_lr()[0]
        optimizer_step(self.optimizer, self.trainable_params, self.scaler, max_grad_norm=MAX_GRAD_NORM)
        self.scheduler.step()
        at.step += 1
        elapsed = time.perf_counter() - started
        trained_tokens = int(at.metrics.get("trained_tokens", 0)) + stats.input_tokens  # kept across a resume
        at.metrics = {
            **stats.metrics,
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
        if self.parallel.is_first and (at.step % self.limits.log_every_steps == 0 or at.step == self.total_steps):
            speed = at.metrics["tokens_per_second"]
            log.info(
                "%s: step %d/%d, train loss %.4f, %.1f tokens/s",
                self.name,
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
        overdue = time.monotonic() - self.last_checkpoint > 60 * self.limits.checkpoint_minutes
        if self.parallel.agree(bool(every and self.position.step % every == 0) or overdue or self.stop()):
            self._checkpoint()
        self._stop_if_requested()

    def _checkpoint(self) -> None:
        if self.checkpoints is not None:
            self.checkpoints.save(self)
        self.last_checkpoint = time.monotonic()

    def _stop_if_requested(self) -> None:
        """The process is stopping: the step's checkpoint is saved, the run can be resumed from it."""
        if self.parallel.agree(self.stop()):
            raise StopRequested(self.position.step)

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
            message=f"{when}: {self.objective.describe(evaluation)}",
        )
        if self.prune is not None and step < self.total_steps:
            self.pruned = self.parallel.agree(self.prune(step, float(evaluation["valid_loss"])))
        return evaluation

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """A copy of what the optimizer updates (the early-stopping snapshot), on the host, whole."""
        with self.parallel.gathered(self.model):
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
        self.parallel.load_trained(self.model, best_state)
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
            "optimizer": self.parallel.optimizer_state(self.model, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {
                "cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            },
            "early_stopping": early_stopping,
            "objective": self.objective.state_dict(self),
        }

    def _load_weights(self, state: dict[str, Any]) -> None:
        """The position and the trained weights (before the model is made data parallel)."""
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

    def _load_training_state(self, state: dict[str, Any]) -> None:
        """The optimizer, schedule, loss scale, random state, early stopping and objective (once the optimizer is
        built over the data-parallel model)."""
        self.parallel.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
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
        self.objective.load_state_dict(self, state.get("objective"))

    @torch.no_grad()
    def evaluate(self, data: Dataset) -> dict[str, float]:
        self.model.eval()
        evaluation = self.objective.evaluate(self, data.examples)
        self.model.train()
        return evaluation

    # --- export ----------------------------------------------------------------------------------
    def export(self, folder: Path | None) -> None:
        """Write the method's artifact; a checkpoint's export mid-training leaves the model in training mode. Of
        several ranks, every one calls it (the weights are gathered from all) and rank 0 writes (`folder` None on
        the others)."""
        training = self.model.training
        self.model.eval()
        try:
            with self.parallel.gathered(self.model):
                if folder is not None:
                    self.method.export(self.model, folder, self.base_weights())
        finally:
            self.model.train(training)

    def base_weights(self) -> BaseWeights:
        return BaseWeights(record=self.record, weights_sha256=self.context.models.weights_sha256(self.record))
