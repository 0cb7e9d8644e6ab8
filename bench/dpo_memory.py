"""Peak memory of a LoRA DPO job against the same LoRA SFT job on the chosen responses (issue 22: DPO at most 1.3x).

    .venv/bin/python bench/dpo_memory.py [--pairs 16] [--batch-size 8] [--words 150] [--threads 2] [--quick]

Both run Tuneforge's training recipe (`app.ml.training.TrainingRecipe`, as the worker does) with LoRA at its
defaults (r=8 on the model's default target modules) for one epoch over the same seeded synthetic data:

  sft   `--pairs` chat examples: each preference line's input and its preferred output (what an SFT job on the
        chosen responses trains on), packed several to a row as the recipe does for supervised jobs;
  dpo   the `--pairs` preference lines themselves, objective "dpo": both outputs of a pair in one micro-batch,
        the reference from the same model with the adapter switched off (no second model).

Both under the same micro-batch token budget (`--max-batch-tokens`, the service's default 2048). Each runs in a
fresh process; memory is the peak resident memory (`ru_maxrss`) above the process's peak once the model is loaded
and its LoRA built (on CUDA: `torch.cuda.max_memory_allocated` above what is allocated then). The script prints
both and the ratio dpo/sft, and exits with status 1 when it is above --target (1.3).

--quick: the tiny random LLaMA of the tests and 8 short pairs (seconds; checks the script, not the figure).
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

from common import (  # bench/, beside this
    BenchReporter,
    add_memory_limit_option,
    add_options,
    convert_once,
    environment,
    parse_options,
    shared_options,
    torch_placement,
)
from process_memory import MEMORY_LIMIT_STATUS, guard_memory, hand_back, rss_peak_mib, run_child, touch_weights

WORDS = (  # noqa: SIM905 (a paragraph of words reads better than a list of 49 strings)
    "the a river stone light morning window garden letter quiet road city evening bread market music harbor "
    "mountain winter paper story friend careful bright slowly across under between over through near after "
    "before because while still often never always simple early late warm cold green blue golden old new"
).split()


def sentence(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."


def preference_lines(n: int, words: int, seed: int) -> list[dict[str, Any]]:
    """Seeded pairs: a question of 20-40 words, two answers of about `words` words each (±20%)."""
    rng = random.Random(seed)

    def answer() -> str:
        return sentence(rng, rng.randint(int(words * 0.8), int(words * 1.2)))

    return [
        {
            "input": {"messages": [{"role": "user", "content": sentence(rng, rng.randint(20, 40))}]},
            "preferred_output": [{"role": "assistant", "content": answer()}],
            "non_preferred_output": [{"role": "assistant", "content": answer()}],
        }
        for _ in range(n)
    ]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """In the child process: one epoch of the recipe in one mode; peak memory above the prepared model."""
    import gc

    import torch

    from app.core.settings import Settings
    from app.ml.methods import METHODS
    from app.ml.methods.base import MethodContext
    from app.ml.models import BUILTINS, ModelStore
    from app.ml.objectives import hyperparameters_class
    from app.ml.training import RecipeLimits, TrainingRecipe, training_base_model

    guard_memory(args.memory_limit_gib)
    placement = torch_placement(args)
    record = BUILTINS[args.model]
    models = ModelStore(args.models_dir, None)
    lines = preference_lines(args.pairs, args.words, args.seed)
    if args.measure == "sft":
        records = [{"messages": [*line["input"]["messages"], *line["preferred_output"]]} for line in lines]
    else:
        records = lines
    method = METHODS["lora"]
    values = {"n_epochs": 1, "batch_size": args.batch_size, "max_seq_length": args.max_seq_length}
    hp = hyperparameters_class("lora", "dpo" if args.measure == "dpo" else "sft").model_validate(values)
    context = MethodContext(record=record, models=models, placement=placement)
    settings = Settings()
    recipe = TrainingRecipe(
        method,
        hp.for_model(record),
        model=training_base_model(method, context),
        tokenizer=models.tokenizer(record),
        context=context,
        train=records,
        valid=None,
        reporter=BenchReporter(args.measure),
        limits=RecipeLimits(args.max_batch_tokens, settings.checkpoint_minutes, settings.log_every_steps),
        objective=args.measure,
    )
    recipe.setup()
    touch_weights(recipe.model)
    gc.collect()
    cuda = placement.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loaded = torch.cuda.memory_allocated() / 2**20
    else:
        loaded = rss_peak_mib()
    started = time.perf_counter()
    metrics = recipe.train()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else rss_peak_mib()
    return {
        "peak_mib": peak,
        "loaded_mib": loaded,
        "seconds": seconds,
        "steps": recipe.position.step,
        "train_loss": metrics["train_loss"],
        "trained_tokens": metrics["trained_tokens"],
        "memory": "CUDA allocated" if cuda else "resident (ru_maxrss)",
        **environment(placement),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser, "--model", "--models-dir", "--device", "--dtype", "--threads")
    parser.add_argument("--pairs", type=int, default=16, help="preference lines (default: 16)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs (or SFT examples) a step (default: 8)")
    parser.add_argument("--words", type=int, default=150, help="words of an answer, ±20%% (default: 150)")
    parser.add_argument("--max-seq-length", type=int, default=512, help="the jobs' max_seq_length (default: 512)")
    parser.add_argument(
        "--max-batch-tokens", type=int, default=2048, help="micro-batch token budget (default: 2048, the service's)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data (default: 0)")
    parser.add_argument("--target", type=float, default=1.3, help="the most DPO/SFT may be (default: 1.3)")
    parser.add_argument("--quick", action="store_true", help="the tiny test model and 8 short pairs: seconds")
    add_memory_limit_option(parser, default_gib=12.0)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one measurement, in a fresh process
    args = parse_options(parser)
    if args.quick and not args.measure:
        args.model, args.pairs, args.batch_size, args.words = "tiny-random-llama", 8, 4, 40
    if min(args.pairs, args.batch_size, args.words, args.max_batch_tokens) < 1:
        parser.error("--pairs, --batch-size, --words and --max-batch-tokens must be positive")
    if args.measure:
        hand_back(measure(args))
        return

    convert_once(args.models_dir, args.model)
    results: dict[str, dict[str, Any]] = {}
    for mode in ("sft", "dpo"):
        options = [
            f"--measure={mode}",
            f"--pairs={args.pairs}",
            f"--batch-size={args.batch_size}",
            f"--words={args.words}",
            f"--max-seq-length={args.max_seq_length}",
            f"--max-batch-tokens={args.max_batch_tokens}",
            f"--seed={args.seed}",
            *shared_options(args),
        ]
        status, result = run_child(__file__, options)
        if status == MEMORY_LIMIT_STATUS:
            raise SystemExit(f"the {mode} run went over --memory-limit-gib={args.memory_limit_gib:g} and was stopped")
        if status != 0 or result is None:
            raise SystemExit(f"the {mode} run failed (exit status {status})")
        results[mode] = result

    sft, dpo = results["sft"], results["dpo"]
    print(
        f"model {args.model} on {sft['placement']}, torch {sft['torch']}, {sft['threads']} threads; LoRA at its "
        f"defaults; {args.pairs} pairs of answers of about {args.words} words, batch {args.batch_size}, "
        f"micro-batches of at most {args.max_batch_tokens} tokens; memory: {sft['memory']}, each run in a fresh process"
    )
    for mode, label in (("sft", "SFT on the chosen responses"), ("dpo", "DPO (reference: adapter off)")):
        r = results[mode]
        print(
            f"{label:<30} {r['steps']} steps in {r['seconds']:6.1f} s, {r['trained_tokens']:6d} tokens  "
            f"peak {r['peak_mib']:7.0f} MiB, {r['peak_mib'] - r['loaded_mib']:7.0f} MiB above the prepared model "
            f"({r['loaded_mib']:.0f} MiB)  train loss {r['train_loss']:.4f}"
        )
    ratio = (dpo["peak_mib"] - dpo["loaded_mib"]) / max(sft["peak_mib"] - sft["loaded_mib"], 1.0)
    print(f"peak memory ratio DPO/SFT (above the prepared model): {ratio:.2f} (target <= {args.target:g})")
    if ratio > args.target:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
