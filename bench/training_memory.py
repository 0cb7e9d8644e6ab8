"""Peak memory and time of one LoRA training step: one padded batch against Tuneforge's micro-batched step.

    .venv/bin/python bench/training_memory.py [--batch-size 10] [--seq-len 256] [--budgets 2048 1024] [--threads 2]

One step (forward + backward, no optimizer update) of LoRA (r=16, alpha=32, on the attention and MLP
projections, through peft as app/ml/methods/lora.py does) on the real base model, over a batch of B
random-token examples of L tokens each, with labels on the second half of every example (like an
assistant turn), seeded:

  baseline   one padded batch through `model(**collate(...))` with labels, then `.loss.backward()`
             (what the worker did before token budgets);
  budget=N   Tuneforge's step, `app.ml.training.loss.accumulate_gradients(..., max_batch_tokens=N)`: micro-batches
             of at most N padded tokens with gradient accumulation (N=2048 is the default
             `train_max_batch_tokens`).

The default size keeps the baseline near 6 GiB: in float32 with these adapters a step holds about 3.4 MiB
of activations per token (measured on 2 CPU cores), so one batch of 16 x 256 tokens would need about 14 GiB.
--memory-limit-gib stops a measurement that goes over (12 GiB unless told).

Each measurement runs in a fresh process, so its peak RSS (`ru_maxrss`) is its own; "above the model" is
that peak minus the peak taken once the model is loaded and wrapped. The losses must agree within 1e-4
(micro-batching may not change the math); the script exits with status 1 when they do not. The gradients
are compared too; LoRA dropout draws other masks when the batch is split, so they agree to float noise
only with --lora-dropout 0.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from common import (  # bench/, beside this
    add_memory_limit_option,
    add_options,
    convert_once,
    environment,
    parse_options,
    set_threads,
    shared_options,
)
from process_memory import (  # bench/, beside this
    MEMORY_LIMIT_STATUS,
    guard_memory,
    hand_back,
    rss_peak_mib,
    run_child,
    touch_weights,
)

from app.ml.device import resolve_placement
from app.ml.methods.base import MethodContext
from app.ml.methods.lora import LoraHyperparameters, LoraMethod
from app.ml.models import BUILTINS, LLAMA_LINEAR_MODULES, ModelStore

LOSS_TOLERANCE = 1e-4


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """In the child process: load, wrap, run the step(s) of one mode, report peak memory, time, loss."""
    import gc
    import random
    import time

    import torch

    from app.ml.formatting import IGNORE_INDEX, EncodedExample
    from app.ml.training.data import collate, micro_batches
    from app.ml.training.loss import accumulate_gradients

    guard_memory(args.memory_limit_gib)
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    models = ModelStore(args.models_dir, None)
    tokenizer = models.tokenizer(BUILTINS[args.model])
    hp = LoraHyperparameters.model_validate(
        {
            "lora_r": 16,
            "lora_alpha": 32,
            "lora_dropout": args.lora_dropout,
            "target_modules": list(LLAMA_LINEAR_MODULES),
        }
    )
    placement = resolve_placement("cpu", "float32")
    context = MethodContext(record=BUILTINS[args.model], models=models, placement=placement)
    model: Any = LoraMethod().prepare(models.load(BUILTINS[args.model]), hp, context)
    model.train()
    device = next(model.parameters()).device

    rng = random.Random(args.seed)
    vocab = int(model.config.vocab_size)
    half = args.seq_len // 2
    examples = []
    for _ in range(args.batch_size):
        ids = [rng.randrange(vocab) for _ in range(args.seq_len)]
        examples.append(EncodedExample(ids, [IGNORE_INDEX] * half + ids[half:]))

    if args.measure == "baseline":
        n_micro = 1

        def step() -> float:
            batch = {name: tensor.to(device) for name, tensor in collate(examples, tokenizer.pad_token_id).items()}
            loss = model(**batch).loss
            loss.backward()
            return float(loss.detach())
    else:
        budget = int(args.measure.removeprefix("budget="))
        n_micro = len(micro_batches(examples, budget))

        def step() -> float:
            stats = accumulate_gradients(model, examples, pad_token_id=tokenizer.pad_token_id, max_batch_tokens=budget)
            return stats.loss

    touch_weights(model)  # memory-mapped from the checkpoint: the first forward pass would count them as the step's
    gc.collect()
    loaded = rss_peak_mib()
    times, loss = [], float("nan")
    for _ in range(args.steps):  # the same step again (no optimizer update): the fastest is the least disturbed
        model.zero_grad(set_to_none=True)
        started = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - started)
    peak = rss_peak_mib()

    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = torch.cat([p.grad.detach().flatten() for p in trainable if p.grad is not None]).cpu()
    torch.save(grads, args.grads_file)
    return {
        "seconds": min(times),
        "peak_mib": peak,
        "loaded_mib": loaded,
        "loss": loss,
        "micro_batches": n_micro,
        **environment(placement),
    }


def run_measurement(args: argparse.Namespace, mode: str, grads_file: Path) -> dict[str, Any]:
    options = [
        f"--measure={mode}",
        f"--grads-file={grads_file}",
        f"--batch-size={args.batch_size}",
        f"--seq-len={args.seq_len}",
        f"--steps={args.steps}",
        f"--seed={args.seed}",
        f"--lora-dropout={args.lora_dropout}",
        *shared_options(args),
    ]
    status, result = run_child(__file__, options)
    if status == MEMORY_LIMIT_STATUS:
        raise SystemExit(
            f"the {mode} measurement went over --memory-limit-gib={args.memory_limit_gib:g} and was stopped: "
            "lower --batch-size or --seq-len (or raise the limit where the machine allows)"
        )
    if status != 0 or result is None:
        raise SystemExit(f"the {mode} measurement failed (exit status {status})")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser, "--model", "--models-dir")
    parser.add_argument("--batch-size", "-B", type=int, default=10, help="examples in the step (default: 10)")
    parser.add_argument("--seq-len", "-L", type=int, default=256, help="tokens per example (default: 256)")
    parser.add_argument(
        "--budgets",
        type=int,
        nargs="+",
        default=[2048, 1024],
        metavar="N",
        help="max_batch_tokens budgets of Tuneforge's step to measure (default: 2048 1024; 2048 is the default "
        "train_max_batch_tokens)",
    )
    parser.add_argument(
        "--steps", type=int, default=3, help="steps per measurement; the fastest gives the time (default: 3)"
    )
    add_options(parser, "--threads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the examples and of torch (default: 0)")
    parser.add_argument(
        "--lora-dropout",
        type=float,
        default=float(LoraHyperparameters.model_fields["lora_dropout"].default),
        help="LoRA dropout (default: %(default)s, the worker's default; 0 makes the gradients comparable too)",
    )
    add_memory_limit_option(parser, default_gib=12.0)
    # Internal: one measurement, run by the script itself in a fresh process.
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--grads-file", help=argparse.SUPPRESS)
    args = parse_options(parser)
    if args.batch_size < 1 or args.seq_len < 4 or args.steps < 1 or min(args.budgets) < 1:
        parser.error("--batch-size, --steps and --budgets must be positive and --seq-len at least 4")

    if args.measure:
        hand_back(measure(args))
        return

    import torch

    convert_once(args.models_dir, args.model)
    modes = ["baseline"] + [f"budget={n}" for n in args.budgets]
    results: dict[str, dict[str, Any]] = {}
    grads: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            grads_file = Path(tmp) / f"{mode}.pt"
            results[mode] = run_measurement(args, mode, grads_file)
            grads[mode] = torch.load(grads_file)

    first = results["baseline"]
    print(
        f"model {args.model} on {first['device']}, torch {first['torch']}, {first['threads']} threads; "
        f"LoRA r=16 alpha=32 dropout {args.lora_dropout:g} on q/k/v/o/gate/up/down_proj"
    )
    print(
        f"one step (forward + backward) over {args.batch_size} examples x {args.seq_len} tokens "
        f"(loss on the last {args.seq_len - args.seq_len // 2} of each); each measurement in a fresh process, "
        f"time: fastest of {args.steps} step(s)"
    )
    for mode in modes:
        r = results[mode]
        if mode == "baseline":
            label = "baseline: one padded batch, model(**batch).loss"
        else:
            n = r["micro_batches"]
            label = f"accumulate_gradients {mode} ({n} micro-batch{'es' if n > 1 else ''})"
        print(
            f"{label:<56} {r['seconds']:7.2f} s/step  peak {r['peak_mib']:7.0f} MiB total, "
            f"{r['peak_mib'] - r['loaded_mib']:7.0f} MiB above the loaded model ({r['loaded_mib']:.0f} MiB)  "
            f"loss {r['loss']:.6f}"
        )
    losses = [r["loss"] for r in results.values()]
    loss_diff = max(losses) - min(losses)
    grad_diff = max(float((grads[m] - grads["baseline"]).abs().max()) for m in modes[1:]) if len(modes) > 1 else 0.0
    grad_scale = float(grads["baseline"].abs().max())
    print(f"loss: max abs difference {loss_diff:.2e} (tolerance {LOSS_TOLERANCE:g})")
    print(
        f"gradients: max abs difference vs baseline {grad_diff:.2e} (largest gradient {grad_scale:.2e})"
        + (f"; LoRA dropout {args.lora_dropout:g} draws other masks per micro-batch" if args.lora_dropout else "")
    )
    for mode in modes[1:]:
        r = results[mode]
        above = (first["peak_mib"] - first["loaded_mib"]) / max(r["peak_mib"] - r["loaded_mib"], 1.0)
        total = first["peak_mib"] / r["peak_mib"]
        print(f"memory ratio baseline/{mode}: {above:.2f} (above the loaded model; of total peaks: {total:.2f})")
    if loss_diff > LOSS_TOLERANCE:
        raise SystemExit(f"FAIL: the losses differ by {loss_diff:.2e} > {LOSS_TOLERANCE:g}")


if __name__ == "__main__":
    main()
