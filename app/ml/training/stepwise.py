"""Training one step at a time, as a client drives it (Tinker's protocol, served by app/tinker/): a LoRA on a base
model; forward/backward passes over the client's examples with one of Tinker's losses, gradients accumulating
until the client asks for an AdamW step with its own hyperparameters.

The passes and the step are the training recipe's (app/ml/training/): the examples go in the recipe's
micro-batches under the device's token budget (`data.micro_batches`, `memory.micro_batch_budget`), their
log-probabilities come from its output layer applied at the examples' positions only (`dpo.token_log_probs`), and
the step is its `loss.optimizer_step` (float16 loss scaling, gradient clipping). What is the client's: the loss of
each pass (below) and the optimizer's hyperparameters of each step.

An example is a token sequence (the model's input) and, per position i, what the loss reads: `target_tokens[i]`
(the token position i predicts), and per loss `weights`, the sampler's `logprobs` and `advantages`. Every pass
returns each example's per-position log-probabilities of its targets under the model now, and the loss summed
over the batch (`loss:sum`); the losses are Tinker's (docs/design/tinker-protocol.md §5.4):

- `cross_entropy`: −Σ weights · logp (weights may be negative: a client's custom loss arrives as them);
- `importance_sampling`: −Σ exp(logp − sampler logp) · advantages;
- `ppo`: −Σ min(r · A, clip(r, low, high) · A), r = exp(logp − sampler logp), bounds from the loss config
  (`clip_low_threshold` 0.8, `clip_high_threshold` 1.2 by default).
"""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from app.ml.device import Placement

# torch and the recipe's parts are imported where they are used: the API's Tinker routes import this module's
# names (LOSSES, Example, StepError) at startup, and an API process that trains nothing never loads torch.

LOSSES = ("cross_entropy", "importance_sampling", "ppo")
# What each loss reads of an example besides `target_tokens`.
LOSS_INPUTS = {
    "cross_entropy": ("weights",),
    "importance_sampling": ("logprobs", "advantages"),
    "ppo": ("logprobs", "advantages"),
}
OPTIMIZER_STATE = "optimizer.pt"
PPO_CLIP = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
ATTENTION = re.compile(r"(^|\.)(self_attn|attn|attention|self_attention)(\.|$)")
MLP = re.compile(r"(^|\.)(mlp|feed_forward|ffn)(\.|$)")


class StepError(ValueError):
    """An example or request the run cannot take: the message says which and why, for the client."""


class NoRoom(StepError):
    """A new run whose state the device's memory cannot hold."""


def run_state_bytes(model: Any, targets: list[str], rank: int) -> int:
    """What a run holds on the device: its LoRA's A and B matrices on each of `targets`, in float32, with their
    gradients and AdamW's two moments (4 copies)."""
    parameters = 0
    for name in targets:
        layer = model.get_submodule(name)
        parameters += rank * (layer.in_features + layer.out_features)
    return parameters * 4 * 4


@dataclass
class Example:
    tokens: list[int]  # the model's input
    inputs: dict[str, Any] = field(default_factory=dict)  # name -> 1-D tensor, one value per input position

    @property
    def input_ids(self) -> list[int]:  # what the recipe's micro-batching measures an example by
        return self.tokens


@dataclass
class PassResult:
    logprobs: list[Any]  # per example: float32 [len(tokens)], on the CPU
    metrics: dict[str, float]


def lora_targets(model: Any, *, attention: bool, mlp: bool, unembed: bool) -> list[str]:
    """The linear layers a LoRA trains: those of the attention blocks, of the MLPs, and the output layer, as asked
    (Tinker's `train_attn`, `train_mlp`, `train_unembed`)."""
    import torch

    names = []
    output = model.get_output_embeddings()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if module is output:
            if unembed:
                names.append(name)
        elif (attention and ATTENTION.search(name)) or (mlp and MLP.search(name)):
            names.append(name)
    return names


class SharedBase:
    """One copy of a base model's weights on its device, for every LoRA trained on it here: each run is an adapter
    of its own on the same PEFT model, made active for its own steps (one step at a time across the runs: `lock`).
    The weights go when the last run closes."""

    def __init__(self, model: Any, placement: Placement, *, max_batch_tokens: int) -> None:
        """`max_batch_tokens`: the operator's micro-batch budget (TUNEFORGE_TRAIN_MAX_BATCH_TOKENS, as for jobs),
        lowered to what the device's free memory holds."""
        from app.ml.training.memory import micro_batch_budget

        self.base = model
        self.placement = placement
        self.max_batch_tokens = micro_batch_budget(model, placement, max_batch_tokens)
        # The linear layers by part, read before any adapter wraps them.
        self.layers = {
            part: lora_targets(model, attention=part == "attention", mlp=part == "mlp", unembed=part == "unembed")
            for part in ("attention", "mlp", "unembed")
        }
        self.model: Any = None  # the PEFT model, once the first run adds its adapter
        self.lock = threading.RLock()
        self.runs = 0
        # The runs' steps computed on one thread: on a CPU each thread that allocates activations keeps an arena of
        # its own (glibc), and a thread per run held a step's peak each (8 GB more for 4 SmolLM2 runs).
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shared-base")

    def check_room(self, needed: int) -> None:
        """Refuse a new run whose state (`needed` bytes) the device's free memory would not hold beside a step's
        activations (the micro-batch budget's share): a clear refusal instead of running out of memory later."""
        import psutil
        import torch

        from app.ml.training.memory import MEMORY_SHARE

        if self.placement.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.placement.device)[0]
        else:
            free = psutil.virtual_memory().available
        room = int(free * (1 - MEMORY_SHARE))
        if needed > room:
            raise NoRoom(
                f"a LoRA of this rank on this model needs {needed / 2**20:,.0f} MiB for its weights, gradients and "
                f"AdamW's state, and this server has {room / 2**20:,.0f} MiB to spare: use a lower rank, train fewer "
                "layers, or close another run"
            )

    def add(self, name: str, config: Any) -> Any:
        from peft import get_peft_model

        with self.lock:
            if self.model is None:
                self.model = get_peft_model(self.base, config, adapter_name=name)
            else:
                self.model.add_adapter(name, config)
            self.runs += 1
            return self.model

    def remove(self, name: str) -> bool:
        """Drop a run's adapter; whether that was the last (the caller lets the base go)."""
        with self.lock:
            if self.model is not None and name in self.model.peft_config and len(self.model.peft_config) > 1:
                self.model.delete_adapter(name)
            self.runs -= 1
            if self.runs <= 0:
                self.executor.shutdown(wait=False)
            return self.runs <= 0


class LoraRun:
    """A fresh LoRA (its B matrices zero: the run starts as the base model) on a shared base model, and an AdamW
    optimizer over the LoRA's weights. Its calls come one at a time (app/tinker/ runs a run's requests in order on
    one thread); runs on the same base take turns on it."""

    def __init__(
        self,
        shared: SharedBase,
        name: str,
        *,
        rank: int,
        seed: int | None,
        attention: bool = True,
        mlp: bool = True,
        unembed: bool = True,
    ) -> None:
        import torch
        from peft import LoraConfig

        asked = {"attention": attention, "mlp": mlp, "unembed": unembed}
        targets = [name for part, names in shared.layers.items() if asked[part] for name in names]
        if not targets:
            raise StepError("no linear layer of this model matches train_attn/train_mlp/train_unembed")
        shared.check_room(run_state_bytes(shared.base, targets, rank))
        config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets, bias="none")
        with shared.lock, torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self.model = shared.add(name, config)
        self.shared = shared
        self.name = name
        self.placement = shared.placement
        self.rank = rank
        marker = f".{name}."
        self.trainable = [p for n, p in self.model.named_parameters() if marker in n and "lora_" in n]
        for parameter in self.trainable:  # trained in float32 whatever the base's dtype (autocast computes)
            parameter.data = parameter.data.float()
            # Gradients kept allocated from here on (zeroed after each step, not freed): freed and allocated again
            # by each backward pass, among the activations of other runs' steps, they left islands that kept the
            # allocator from reusing that memory (0.9 GB more resident per run training at once, on a CPU).
            parameter.grad = torch.zeros_like(parameter)
        self.optimizer = torch.optim.AdamW(self.trainable, lr=1e-4)
        # float16's narrow range underflows small gradients: the loss is scaled (bfloat16 has float32's range).
        self.scaler = torch.amp.GradScaler(self.placement.device.type, enabled=self.placement.dtype == torch.float16)
        self.examples_since_step = 0

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable)

    def close(self) -> bool:
        """Let the adapter go; whether the base has no run left."""
        return self.shared.remove(self.name)

    def forward_backward(
        self, examples: list[Example], loss_fn: str, config: dict[str, float], *, forward_only: bool = False
    ) -> PassResult:
        """One pass over the batch: each example's log-probabilities of its targets and the batch's loss; unless
        `forward_only`, the loss's gradients added to those kept for the next `optim_step`."""
        import torch

        from app.ml.training.data import micro_batches
        from app.ml.training.dpo import token_log_probs

        if loss_fn not in LOSSES:
            raise StepError(f"loss_fn {loss_fn!r} is not one of {', '.join(LOSSES)}")
        if not examples:
            raise StepError("no examples")
        vocabulary = self.model.get_output_embeddings().weight.shape[0]
        for example in examples:
            targets = example.inputs["target_tokens"]
            if int(targets.max()) >= vocabulary or int(targets.min()) < 0:
                raise StepError("target_tokens: a token id outside the model's vocabulary")
        device = self.placement.device
        logprobs: dict[int, Any] = {}  # by the example's place in `examples`
        place = {id(example): i for i, example in enumerate(examples)}
        total = torch.zeros((), device=device)
        with self.shared.lock:
            self._activate()
            # The recipe's micro-batches: only one group's activations alive at a time, whatever the request.
            for group in micro_batches(examples, self.shared.max_batch_tokens):
                ids, mask, targets = _collate(group, device)
                with torch.set_grad_enabled(not forward_only), self.placement.autocast():
                    flat = token_log_probs(self.model, ids, mask, targets, mask.bool())
                    rows = torch.zeros(targets.shape, dtype=torch.float32, device=device).masked_scatter(
                        mask.bool(), flat
                    )
                    loss = sum(
                        (_loss(loss_fn, rows[i, : len(e.tokens)], e, config, device) for i, e in enumerate(group)),
                        torch.zeros((), device=device),
                    )
                if not forward_only:
                    self.scaler.scale(loss).backward()
                total += loss.detach()
                for i, example in enumerate(group):
                    logprobs[place[id(example)]] = rows[i, : len(example.tokens)].detach().float().cpu()
                del loss, rows, flat
            if not forward_only:
                self.examples_since_step += len(examples)
        return PassResult(logprobs=[logprobs[i] for i in range(len(examples))], metrics={"loss:sum": float(total)})

    def _activate(self) -> None:
        """This run's adapter on (PEFT then trains its weights only); the caller holds the base's lock."""
        self.model.set_adapter(self.name)
        self.model.train()

    def export(self, folder: Any) -> None:
        """The LoRA in PEFT's format (adapter_config.json, adapter_model.safetensors) into `folder`."""
        import shutil
        import tempfile
        from pathlib import Path

        with self.shared.lock, tempfile.TemporaryDirectory(dir=folder) as tmp:
            # Into tmp/<name>/ (not the default adapter's folder). The LoRA's own weights only: with tied input and
            # output embeddings PEFT would otherwise save the (untrained) embedding matrix with every checkpoint.
            self.model.save_pretrained(tmp, selected_adapters=[self.name], save_embedding_layers=False)
            saved = Path(tmp) / self.name
            for item in saved.iterdir():
                shutil.move(str(item), str(Path(folder) / item.name))

    def save_state(self, folder: Any) -> None:
        """Everything to resume exactly: the LoRA (PEFT's files) and, in `optimizer.pt`, AdamW's state and the
        float16 loss scale."""
        import torch

        self.export(folder)
        state = {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}
        torch.save(state, str(folder / OPTIMIZER_STATE))

    def load_state(self, folder: Any, *, optimizer: bool) -> None:
        """The LoRA's weights from a saved state (and, with `optimizer`, AdamW's moments and step counts)."""
        import torch
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = load_file(str(folder / "adapter_model.safetensors"), device=str(self.placement.device))
        with self.shared.lock:
            set_peft_model_state_dict(self.model, weights, adapter_name=self.name)
        for parameter in self.trainable:
            parameter.data = parameter.data.float()
        if optimizer:
            state = torch.load(str(folder / OPTIMIZER_STATE), map_location=self.placement.device, weights_only=True)
            self.optimizer.load_state_dict(state["optimizer"])
            if state["scaler"]:
                self.scaler.load_state_dict(state["scaler"])

    def optim_step(
        self,
        *,
        learning_rate: float,
        beta1: float = 0.9,
        beta2: float = 0.95,
        eps: float = 1e-12,
        weight_decay: float = 0.0,
        grad_clip_norm: float = 0.0,
    ) -> dict[str, float]:
        """An AdamW step with these hyperparameters over the gradients added since the last one (none: no change),
        then the gradients cleared."""
        from app.ml.training.loss import optimizer_step

        if self.examples_since_step == 0:
            return {}
        for group in self.optimizer.param_groups:
            group.update(lr=learning_rate, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)
        with self.shared.lock:
            norm = optimizer_step(
                self.optimizer, self.trainable, self.scaler, max_grad_norm=grad_clip_norm, keep_gradients=True
            )
        self.examples_since_step = 0
        return {"grad_norm:mean": norm} if norm is not None else {}


def _collate(group: list[Example], device: Any) -> tuple[Any, Any, Any]:
    """A micro-batch's input ids, attention mask and targets, padded on the right to its longest example."""
    import torch

    length = max(len(e.tokens) for e in group)
    ids = torch.zeros((len(group), length), dtype=torch.long)
    mask = torch.zeros((len(group), length), dtype=torch.long)
    targets = torch.zeros((len(group), length), dtype=torch.long)
    for i, example in enumerate(group):
        n = len(example.tokens)
        ids[i, :n] = torch.tensor(example.tokens)
        mask[i, :n] = 1
        targets[i, :n] = example.inputs["target_tokens"].long()
    return ids.to(device), mask.to(device), targets.to(device)


def _loss(loss_fn: str, logprobs: Any, example: Example, config: dict[str, float], device: Any) -> Any:
    import torch

    def given(name: str) -> Any:
        value = example.inputs.get(name)
        if value is None:
            raise StepError(f"loss_fn_inputs: {loss_fn} needs {name!r}")
        if value.shape[0] != logprobs.shape[0]:
            raise StepError(f"loss_fn_inputs: {name!r} has {value.shape[0]} values for {logprobs.shape[0]} positions")
        return value.to(device=device, dtype=torch.float32)

    if loss_fn == "cross_entropy":
        weights = given("weights") if "weights" in example.inputs else torch.ones_like(logprobs)
        return -(logprobs * weights).sum()
    ratio = torch.exp(logprobs - given("logprobs"))
    advantages = given("advantages")
    if loss_fn == "importance_sampling":
        return -(ratio * advantages).sum()
    low = config.get("clip_low_threshold", PPO_CLIP["clip_low_threshold"])
    high = config.get("clip_high_threshold", PPO_CLIP["clip_high_threshold"])
    return -torch.minimum(ratio * advantages, ratio.clamp(low, high) * advantages).sum()
