"""Tinker's training API (issue 23): what the protocol costs, and many runs on one base model.

    .venv/bin/python bench/training_api.py [--steps 6] [--batch 8] [--tokens 128] [--runs 8] [--threads 2] [--quick]

1. The same LoRA steps (`forward_backward` with `cross_entropy` on `--batch` examples of `--tokens` tokens, then an
   AdamW `optim_step`) run twice: through the official `tinker` client against a live Tuneforge (uvicorn on
   loopback, in this process: protobuf over HTTP, futures polled) and in-process on the same step code
   (`app.ml.training.stepwise.LoraRun`, what the server runs). Prints tokens/s of each and their ratio (target
   issue 23: the client at least 0.8x).
2. `--runs` training runs at once through the client (a thread each, the same steps) against one run alone:
   aggregate tokens/s, and the process's peak resident memory, which should grow by the LoRAs and optimizer
   states only: the runs share one copy of the base model's weights.

The first step of each run is warm-up and not timed. --quick: the tiny random LLaMA, 2 steps (checks the script).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import add_options, bench_settings, convert_once, environment, parse_options, torch_placement

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def batch(args: argparse.Namespace, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(10, 4000) for _ in range(args.tokens + 1)] for _ in range(args.batch)]


def client_steps(service: Any, model: str, args: argparse.Namespace, seed: int) -> float:
    """Tokens/s of `--steps` timed steps through the client (after one untimed)."""
    from tinker import types

    training = service.create_lora_training_client(base_model=model, rank=16, seed=seed).result()
    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints(seq[:-1]),
            loss_fn_inputs={"target_tokens": seq[1:], "weights": [1.0] * args.tokens},
        )
        for seq in batch(args, seed)
    ]
    adam = types.AdamParams(learning_rate=1e-4)
    started = 0.0
    for step in range(args.steps + 1):
        if step == 1:
            started = time.perf_counter()
        training.forward_backward(data, "cross_entropy")
        training.optim_step(adam).result()
    return args.steps * args.batch * args.tokens / (time.perf_counter() - started)


def in_process_steps(settings: Any, model: str, args: argparse.Namespace) -> float:
    import torch

    from app.ml.device import resolve_placement
    from app.ml.models import BUILTINS, ModelStore
    from app.ml.training.stepwise import Example, LoraRun, SharedBase

    placement = resolve_placement(settings.device, settings.dtype)
    model_weights = ModelStore(settings.models_dir, None).load(BUILTINS[model], placement)
    shared = SharedBase(model_weights, placement, max_batch_tokens=settings.train_max_batch_tokens)
    run = LoraRun(shared, "bench", rank=16, seed=0)
    examples = [
        Example(seq[:-1], {"target_tokens": torch.tensor(seq[1:]), "weights": torch.ones(args.tokens)})
        for seq in batch(args, 0)
    ]
    started = 0.0
    for step in range(args.steps + 1):
        if step == 1:
            started = time.perf_counter()
        run.forward_backward(examples, "cross_entropy", {})
        run.optim_step(learning_rate=1e-4)
    return args.steps * args.batch * args.tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser, "--model", "--models-dir", "--device", "--dtype", "--threads")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run (after one warm-up)")
    parser.add_argument("--batch", type=int, default=8, help="examples per forward_backward")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per example")
    parser.add_argument("--runs", type=int, default=8, help="training runs at once in part 2")
    parser.add_argument("--quick", action="store_true", help="the tiny model, 2 steps: checks the script")
    args = parse_options(parser)
    if args.quick:
        args.model, args.steps, args.tokens, args.runs = "tiny-random-llama", 2, 32, 3
    placement = torch_placement(args)
    convert_once(args.models_dir, args.model)
    print(f"model {args.model}; {environment(placement)}; LoRA r=16 on all linear layers and the output layer")
    print(f"a step: forward_backward on {args.batch} examples of {args.tokens} tokens, then optim_step (AdamW)")

    import tinker

    from app.auth.service import create_api_key
    from app.core.db import migrate, session_scope
    from app.main import create_app
    from tests.conftest import live

    with tempfile.TemporaryDirectory(prefix="bench-tinker-") as tmp:
        settings = bench_settings(Path(tmp), args).model_copy(
            update={"tinker_max_runs": args.runs + 2, "tinker_max_runs_per_tenant": args.runs + 2}
        )
        migrate(settings.db_url)
        with session_scope(settings.db_url) as session:
            key = create_api_key(session, tenant_name="bench")
        in_process = in_process_steps(settings, args.model, args)
        with live(create_app(settings)) as url:
            service = tinker.ServiceClient(base_url=url, api_key=f"tml-{key}")
            through_client = client_steps(service, args.model, args, seed=1)
            print(f"in-process (the server's step code)   {in_process:9.1f} tokens/s")
            print(f"through the tinker client             {through_client:9.1f} tokens/s")
            print(f"client / in-process: {through_client / in_process:.2f} (target >= 0.8)")

            before = rss_mib()
            rates: list[float] = [0.0] * args.runs
            started = time.perf_counter()

            def one(i: int) -> None:
                rates[i] = client_steps(service, args.model, args, seed=10 + i)

            threads = [threading.Thread(target=one, args=(i,)) for i in range(args.runs)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.perf_counter() - started
            total = args.runs * (args.steps + 1) * args.batch * args.tokens
            print(
                f"{args.runs} runs at once: {total / elapsed:9.1f} tokens/s in all, warm-up steps included "
                f"(one alone: {through_client:.1f}); "
                f"peak RSS {rss_mib():.0f} MiB, {rss_mib() - before:.0f} MiB more than with one run "
                f"(the base model's weights are held once)"
            )


if __name__ == "__main__":
    main()
