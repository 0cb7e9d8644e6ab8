"""Every fine-tuning method that runs on this machine, trained on one small dataset and compared in one table.

    .venv/bin/python bench/methods.py [--model smollm2-135m-instruct] [--methods lora,ia3,...] [--epochs 1]
                                      [--device auto] [--dtype auto] [--threads 2]

The dataset is committed: bench/data/greetings_train.jsonl (200 chat examples) teaches the model to begin every
answer with the pirate greeting "Ahoy!", which the untuned model never does; bench/data/greetings_heldout.jsonl
(40 examples on other topics, some in phrasings never trained on) is the held-out set. bench/data/make_greetings.py
writes both.

Each method trains through the worker's own recipe (`worker.training.job_recipe`: setup, train, export) with the
held-out file as its validation file, evaluated at the end of every epoch (and every --eval-every steps if
given), batch size 8, max_seq_length 128, seed 42, and the method's own default hyperparameters except the
learning rate (each method's is printed; --learning-rates overrides them) and, for layerwise, one more block
unfrozen every 5 steps instead of every epoch (so that blocks do unfreeze in a short run). The adapter it exports
is packed, stored and served like a published one (`app.ml.serving.GenerationEngine`), and answers each held-out
prompt greedily (temperature 0, --max-new-tokens 16).

Per method, in the table:
  trainable params   the parameters that train (require grad at the end of training), and their share of the
                     base model's parameter count (an untied output layer counts once more, a new copy);
  train time         wall time of `recipe.train()` less its validation passes;
  tokens/s           every token fed in training (padding excluded) / train time;
  peak RSS           the peak resident memory of the method's own process (`ru_maxrss`) once training is done,
                     and how much of it came on top of the peak after setup (model loaded and prepared);
                     on CUDA also `torch.cuda.max_memory_allocated()`;
  best valid loss    the lowest validation loss of the run (mean token loss over the held-out answers) and its
                     perplexity; the "base model (untuned)" row has the untuned model's on the same examples;
  "Ahoy!" share      held-out prompts whose greedy answer (from the final weights, served from the exported
                     artifact) begins with "Ahoy!"; the base row has the untuned model's share.

Each method and the base model run in a fresh process of this script, so that each peak memory is its own.
qlora needs CUDA and bitsandbytes: elsewhere it is skipped, and the output says so. On 2 CPU cores the default
run (the base model and the 9 methods that run on a CPU, 1 epoch of 25 steps each) takes about 15 minutes on a
quiet machine, longer when other processes share it (times and tokens/s then say more about the load than about
the method). The end of the output is a Markdown table to paste into BENCHMARKS.md, with the command line that
made it.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import (  # bench/, beside this
    BenchReporter,
    add_options,
    bench_settings,
    command_line,
    convert_once,
    cpu_name,
    environment,
    library_versions,
    parse_options,
    serving_limits,
    set_threads,
    shared_options,
)
from process_memory import hand_back, rss_peak_mib, run_child  # bench/, beside this

# Loaded from the start, as when common.py imported it eagerly: each method's peak RSS has always counted it.
import app.inference.engine  # noqa: F401
from app.core.settings import Settings
from app.core.storage import ObjectStorage
from app.ml.device import cuda_training_available
from app.ml.methods import METHODS
from app.ml.models import BUILTINS, ModelRecord, ModelStore

DATA_DIR = Path(__file__).resolve().parent / "data"
TRAIN_FILE = DATA_DIR / "greetings_train.jsonl"
HELDOUT_FILE = DATA_DIR / "greetings_heldout.jsonl"
TRAIN_KEY = "datasets/bench/greetings_train.jsonl"
HELDOUT_KEY = "datasets/bench/greetings_heldout.jsonl"
GREETING = "Ahoy!"  # the behaviour: a reply that begins with it
BASE = "base"  # the untuned base model's run

# What every method trains with here (fast on 2 CPU cores).
COMMON_HYPERPARAMETERS: dict[str, Any] = {"batch_size": 8, "max_seq_length": 128, "seed": 42}
# Peak learning rates that make each method learn the behaviour in a run this short (tuned by short trials on
# 2 CPU cores); everything else is the method's default, except layerwise's unfreezing schedule. A method not
# listed here trains at its own default learning rate.
LEARNING_RATES: dict[str, float] = {
    "lora": 1e-3,
    "qlora": 1e-3,
    "prefix_tuning": 5e-2,  # its default since this benchmark: 1e-2 did not undo PEFT's random prefix in 25 steps
    "prompt_tuning": 1e-1,
    "p_tuning": 3e-3,
    "ia3": 1e-2,
    "head": 2e-3,  # its default since this benchmark: at 3e-4 no answer began with the greeting after one epoch
    "layerwise": 3e-4,
    "discriminative": 3e-4,
    "full": 5e-5,
}
# The table's order: the PEFT family, then the weight-delta family from the fewest weights trained to all.
ORDER = (
    "lora",
    "qlora",
    "ia3",
    "prompt_tuning",
    "p_tuning",
    "prefix_tuning",
    "head",
    "layerwise",
    "discriminative",
    "full",
)
METHOD_HYPERPARAMETERS: dict[str, dict[str, Any]] = {
    "layerwise": {"unfreeze_unit": "steps", "unfreeze_every": 5},
}


def hyperparameters_for(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The method's hyperparameters in this benchmark, before the method's own validation."""
    return {
        **COMMON_HYPERPARAMETERS,
        "n_epochs": args.epochs,
        **({"learning_rate": rate} if (rate := args.learning_rates.get(name, LEARNING_RATES.get(name))) else {}),
        **({"eval_every": args.eval_every} if args.eval_every else {}),
        **METHOD_HYPERPARAMETERS.get(name, {}),
    }


def held_out_prompts() -> list[list[dict[str, str]]]:
    """The held-out conversations up to their first assistant turn: what the model is asked."""
    prompts = []
    for line in HELDOUT_FILE.read_text().splitlines():
        messages = json.loads(line)["messages"]
        first_answer = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompts.append(messages[:first_answer])
    return prompts


# --- in a child process: one measurement -----------------------------------------------------------------
def behaviour_share(
    settings: Settings, storage: ObjectStorage, record: ModelRecord, placement: Any, adapter: Any, max_new_tokens: int
) -> dict[str, Any]:
    """Greedy answers to the held-out prompts through the serving engine, and how many begin with the greeting."""
    from app.ml.formatting import encode_chat_prompt
    from app.ml.serving import GenerationEngine, GenerationRequest

    models = ModelStore(settings.models_dir, storage)
    tokenizer = models.tokenizer(record)
    engine = GenerationEngine(
        models=models,
        placement=placement,
        storage=storage,
        cache_dir=settings.data_dir / "cache",
        limits=serving_limits(max_adapters=1),
    )
    answers = []
    started = time.perf_counter()
    try:
        for messages in held_out_prompts():
            request = GenerationRequest(
                record,
                encode_chat_prompt(tokenizer, messages),
                adapter=adapter,
                max_tokens=max_new_tokens,
                temperature=0,
            )
            answers.append(engine.generate(request).text)
    finally:
        engine.close()
    shown = sum(1 for text in answers if text.lstrip().startswith(GREETING))
    return {
        "shown": shown,
        "prompts": len(answers),
        "generation_seconds": time.perf_counter() - started,
        "sample": answers[0] if answers else "",
    }


def measure_base(args: argparse.Namespace, settings: Settings, storage: ObjectStorage) -> dict[str, Any]:
    from app.ml.device import resolve_placement
    from app.ml.models import pad_token_id
    from app.ml.training.data import encode_examples, read_examples
    from app.ml.training.loss import evaluation_stats

    record = BUILTINS[args.model]
    placement = resolve_placement(settings.device, settings.dtype)
    models = ModelStore(settings.models_dir, storage)
    tokenizer = models.tokenizer(record)
    heldout = encode_examples(read_examples(storage, HELDOUT_KEY), tokenizer, COMMON_HYPERPARAMETERS["max_seq_length"])
    model = models.load(record, placement)
    total = sum(p.numel() for p in model.parameters())
    stats = evaluation_stats(
        model,
        heldout.examples,
        pad_token_id=pad_token_id(tokenizer),
        max_batch_tokens=settings.train_max_batch_tokens,
        placement=placement,
    )
    del model
    rss = rss_peak_mib()
    behaviour = behaviour_share(settings, storage, record, placement, None, args.max_new_tokens)
    return {
        "trainable": 0,
        "total": total,
        "valid_loss": stats.loss,
        "heldout_examples": len(heldout.examples),
        "peak_rss_mib": rss,
        **behaviour,
        **environment(placement),
        "versions": library_versions(),
    }


def timed(function: Callable[[Any], dict[str, float]], seconds: list[float]) -> Callable[[Any], dict[str, float]]:
    """`function`, appending the wall time of each call to `seconds`."""

    def wrapper(data: Any) -> dict[str, float]:
        started = time.perf_counter()
        try:
            return function(data)
        finally:
            seconds.append(time.perf_counter() - started)

    return wrapper


def measure_method(args: argparse.Namespace, settings: Settings, storage: ObjectStorage) -> dict[str, Any]:
    import torch

    from app.jobs.state import ClaimedJob
    from app.ml import adapter_format
    from app.ml.serving import AdapterRef
    from worker.training import job_recipe

    name = args.run
    method = METHODS[name]
    record = BUILTINS[args.model]
    hp = method.hyperparameters.model_validate(hyperparameters_for(name, args)).for_model(record)
    job = ClaimedJob(
        id=f"ftjob-bench-{name}",
        tenant_id="bench",
        base_model=record.id,
        base_model_revision=record.revision,
        method=name,
        training_file_key=TRAIN_KEY,
        validation_file_key=HELDOUT_KEY,
        suffix=None,
        hyperparameters=hp.model_dump(mode="json"),
        attempt=1,
    )
    reporter = BenchReporter(name, verbose=True)
    recipe = job_recipe(settings, storage, job, record, reporter, None)
    recipe.setup()
    cuda = recipe.placement.device.type == "cuda"
    setup_rss = rss_peak_mib()

    evaluation_seconds: list[float] = []  # the validation passes inside train(), timed apart
    recipe.evaluate = timed(recipe.evaluate, evaluation_seconds)  # type: ignore[method-assign,assignment]
    started = time.perf_counter()
    final = recipe.train()
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    del recipe.evaluate  # the class's own again
    trainable_at_end = sum(p.numel() for p in recipe.model.parameters() if p.requires_grad)
    peak_rss = rss_peak_mib()
    peak_cuda = torch.cuda.max_memory_allocated(recipe.placement.device) / 2**20 if cuda else None

    [start] = [d for d in reporter.of_type("log") if "trainable_parameters" in d]
    steps = reporter.of_type("metrics")
    evaluations = reporter.of_type("eval")
    epochs_done = max(d["epoch"] for d in steps)  # whole epochs: this benchmark does not stop early
    tokens = recipe.train_data.n_tokens * epochs_done
    train_seconds = wall - sum(evaluation_seconds)
    best = min(evaluations, key=lambda d: d["valid_loss"])

    # Publish the adapter as the worker does, and serve it from storage.
    tmp = settings.data_dir / "export"
    folder = tmp / "adapter"
    folder.mkdir(parents=True)
    recipe.export(folder)
    archive = tmp / "adapter.tar.gz"
    adapter_id = f"adapter-bench-{name}"
    size, sha256 = adapter_format.pack(
        folder,
        archive,
        {
            "adapter_id": adapter_id,
            "job_id": job.id,
            "base_model": record.id,
            "method": name,
            "format": method.artifact_format,
            "base_model_revision": record.revision,
            "base_model_weights_sha256": recipe.base_weights().weights_sha256,
            "hyperparameters": job.hyperparameters,
            "metrics": final,
        },
    )
    key = f"adapters/bench/{adapter_id}.tar.gz"
    storage.put_path(key, archive)
    placement = recipe.placement
    del recipe  # the trained model: the engine serves the artifact, on a base model of its own
    gc.collect()
    behaviour = behaviour_share(
        settings, storage, record, placement, AdapterRef(adapter_id, key, sha256, method=name), args.max_new_tokens
    )
    return {
        "trainable": trainable_at_end,
        "optimizer_parameters": start["trainable_parameters"],
        "total": start["total_parameters"],
        "train_examples": start["train_examples"],
        "steps": len(steps),
        "epochs": epochs_done,
        "train_seconds": train_seconds,
        "evaluation_seconds": sum(evaluation_seconds),
        "tokens": tokens,
        "mean_step_tokens_per_second": sum(d["tokens_per_second"] for d in steps) / len(steps),
        "first_train_loss": steps[0]["train_loss"],
        "last_train_loss": steps[-1]["train_loss"],
        "valid_loss": best["valid_loss"],
        "best_step": best["step"],
        "last_valid_loss": evaluations[-1]["valid_loss"],
        "peak_rss_mib": peak_rss,
        "setup_rss_mib": setup_rss,
        "peak_cuda_mib": peak_cuda,
        "artifact_bytes": size,
        "hyperparameters": {k: v for k, v in job.hyperparameters.items() if v is not None},
        **behaviour,
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """In the child process: the base model's figures (--run base) or one method's (--run NAME)."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notices, not ours
    set_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-methods-") as tmp:
        settings = bench_settings(Path(tmp), args)
        storage = ObjectStorage.from_settings(settings)
        storage.put_bytes(TRAIN_KEY, TRAIN_FILE.read_bytes())
        storage.put_bytes(HELDOUT_KEY, HELDOUT_FILE.read_bytes())
        if args.run == BASE:
            return measure_base(args, settings, storage)
        return measure_method(args, settings, storage)


# --- in the parent process: one child per measurement, then the table ---------------------------------------
def run_measurement(args: argparse.Namespace, name: str) -> tuple[dict[str, Any] | None, float]:
    """Runs one measurement in a fresh process; its progress goes to stderr. Returns (result or None, seconds)."""
    options = [
        f"--run={name}",
        f"--epochs={args.epochs}",
        f"--max-new-tokens={args.max_new_tokens}",
        f"--learning-rates={','.join(f'{k}={v}' for k, v in args.learning_rates.items())}",
        *shared_options(args),
    ]
    if args.eval_every:
        options.append(f"--eval-every={args.eval_every}")
    started = time.perf_counter()
    status, result = run_child(__file__, options)
    seconds = time.perf_counter() - started
    if status != 0 or result is None:
        print(f"{name}: FAILED (exit status {status}); its traceback is above", flush=True)
        return None, seconds
    return result, seconds


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def share(result: dict[str, Any]) -> str:
    return f"{result['shown']}/{result['prompts']} ({100 * result['shown'] / max(result['prompts'], 1):.0f}%)"


def table(results: dict[str, dict[str, Any] | None], skipped: dict[str, str], cuda: bool, n_base: int) -> list[str]:
    header = [
        "method",
        "trainable params (share of base)",
        "train time",
        "tokens/s",
        "peak RSS MiB (+ in training)",
        *(["peak CUDA MiB"] if cuda else []),
        "best valid loss",
        "perplexity",
        f'"{GREETING}" share',
    ]
    rows = [header, ["---"] * len(header)]
    for name, r in results.items():
        if r is None:
            rows.append([name, "failed", *[""] * (len(header) - 2)])
            continue
        if name == BASE:
            label, params, seconds, speed = "base model (untuned)", "0", "–", "–"
            memory = f"{r['peak_rss_mib']:,.0f}"
            peak_cuda = ["–"]
        else:
            label = name
            params = f"{r['trainable']:,} ({100 * r['trainable'] / n_base:.3g}%)"
            if r["trainable"] != r["optimizer_parameters"]:
                params += " *"
            seconds = f"{r['train_seconds']:.0f} s"
            speed = f"{r['tokens'] / r['train_seconds']:.0f}"
            memory = f"{r['peak_rss_mib']:,.0f} (+{r['peak_rss_mib'] - r['setup_rss_mib']:,.0f})"
            peak_cuda = [f"{r['peak_cuda_mib']:,.0f}" if r["peak_cuda_mib"] is not None else "–"]
        rows.append(
            [
                label,
                params,
                seconds,
                speed,
                memory,
                *(peak_cuda if cuda else []),
                f"{r['valid_loss']:.3f}",
                f"{perplexity(r['valid_loss']):.2f}",
                share(r),
            ]
        )
    for name, why in skipped.items():
        rows.append([name, f"skipped: {why}", *[""] * (len(header) - 2)])
    return ["| " + " | ".join(row) + " |" for row in rows]


def skip_reason(name: str, device: str) -> str | None:
    if not METHODS[name].needs_cuda or cuda_training_available(device):
        return None
    import importlib.util

    import torch

    if device in ("cpu", "mps"):
        return f"needs a CUDA GPU (--device {device})"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "needs bitsandbytes (pip install 'tuneforge[gpu]')"
    return "needs CUDA and bitsandbytes"


def parse_learning_rates(text: str) -> dict[str, float]:
    rates = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in METHODS or not value:
            raise argparse.ArgumentTypeError(f"{item!r}: expected METHOD=RATE with METHOD one of {', '.join(METHODS)}")
        rates[name] = float(value)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser, "--model")
    parser.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated methods to train, in that order (default: all of {','.join(ORDER)} that run on "
        "this machine; qlora only with CUDA and bitsandbytes)",
    )
    parser.add_argument("--epochs", type=int, default=1, help="training epochs of every method (default: 1)")
    parser.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="also evaluate every this many steps (default: only at the end of each epoch); the best "
        "evaluation gives the table's validation loss",
    )
    parser.add_argument(
        "--learning-rates",
        type=parse_learning_rates,
        default={},
        metavar="METHOD=RATE,...",
        help="override the benchmark's learning rates, e.g. lora=5e-4,full=2e-5 (defaults: "
        + ", ".join(f"{k} {v:g}" for k, v in LEARNING_RATES.items())
        + ")",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=16, help="tokens generated per held-out prompt, greedily (default: 16)"
    )
    add_options(parser, "--device", "--dtype", "--threads", "--models-dir")
    # Internal: one measurement, run by the script itself in a fresh process.
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parse_options(parser)
    if args.epochs < 1 or args.max_new_tokens < 1 or (args.eval_every is not None and args.eval_every < 1):
        parser.error("--epochs, --max-new-tokens and --eval-every must be positive")

    if args.run:
        hand_back(measure(args))
        return

    every = sorted(METHODS, key=lambda m: ORDER.index(m) if m in ORDER else len(ORDER))
    names = every if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        parser.error(f"unknown method {unknown[0]}; the methods: {', '.join(METHODS)}")
    skipped = {name: why for name in names if (why := skip_reason(name, args.device)) is not None}
    for name, why in skipped.items():
        print(f"{name}: skipped, it {why}", flush=True)
    names = [name for name in names if name not in skipped]

    started = time.perf_counter()
    convert_once(args.models_dir, args.model)
    results: dict[str, dict[str, Any] | None] = {}
    for name in [BASE, *names]:
        print(f"{name}: running ...", flush=True)
        result, seconds = run_measurement(args, name)
        results[name] = result
        if result is not None:
            what = (
                f"{result['train_seconds']:.0f} s training, best valid loss {result['valid_loss']:.3f}"
                if name != BASE
                else f"valid loss {result['valid_loss']:.3f}"
            )
            print(f"{name}: done in {seconds:.0f} s ({what}, {share(result)} answers begin with {GREETING})")
    total = time.perf_counter() - started

    base = results[BASE]
    cuda = any(r is not None and r.get("peak_cuda_mib") is not None for r in results.values())
    print()
    print(f"command: {command_line()}")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} CPUs ({cpus} usable)"
        + (f", torch {base['threads']} threads, on {base['placement']}; {base['versions']}" if base else "")
    )
    print(
        f"model {args.model}; {len(TRAIN_FILE.read_text().splitlines())} training examples "
        f"({TRAIN_FILE.relative_to(DATA_DIR.parent.parent)}), "
        f"{len(HELDOUT_FILE.read_text().splitlines())} held-out ({HELDOUT_FILE.relative_to(DATA_DIR.parent.parent)}); "
        f"{args.epochs} epoch(s), batch size {COMMON_HYPERPARAMETERS['batch_size']}, greedy answers of at most "
        f"{args.max_new_tokens} tokens; total wall time {total / 60:.1f} min"
    )
    print()
    n_base = BUILTINS[args.model].n_parameters or (base["total"] if base else 1)
    print("\n".join(table(results, skipped, cuda, n_base)))
    for name in names:
        r = results[name]
        if r is not None and r["trainable"] != r["optimizer_parameters"]:
            print(
                f"* {name}: what required grad at the end of training; over the whole job the optimizer may update "
                f"{r['optimizer_parameters']:,} (what the recipe reports at the start)"
            )
    print()
    print("hyperparameters (each method's defaults otherwise):")
    for name in names:
        r = results[name]
        if r is not None:
            defaults = (
                METHODS[name].hyperparameters.model_validate({}).for_model(BUILTINS[args.model]).model_dump(mode="json")
            )
            changed = {k: v for k, v in r["hyperparameters"].items() if defaults.get(k) != v}
            print(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in changed.items()))
    print("first held-out prompt's answer:")
    prompt = held_out_prompts()[0][-1]["content"]
    print(f"  prompt: {prompt!r}")
    for name, r in results.items():
        if r is not None:
            print(f"  {name}: {r['sample']!r}")
    if any(r is None for r in results.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
