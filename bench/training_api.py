"""Tinker's training API (issue 23): what the protocol costs, and many runs on one base model.

    .venv/bin/python bench/training_api.py [--steps 6] [--batch 8] [--tokens 128] [--runs 8] [--threads 2] [--quick]

1. The same LoRA steps (`forward_backward` with `cross_entropy` on `--batch` examples of `--tokens` tokens, then an
   AdamW `optim_step`) run twice: through the official `tinker` client against a real Tuneforge API process
   (`python -m app.cli api` on the embedded default, on loopback: protobuf over HTTP, futures polled), and
   in-process on the same step code (`app.ml.training.stepwise.LoraRun`, what the server runs). Prints tokens/s of
   each and their ratio (target issue 23: the client at least 0.8x).
2. `--runs` training runs at once through the client (a thread each, the same steps) against one run alone:
   aggregate tokens/s, and the API process's resident memory (read from /proc), which should grow by the LoRAs and
   optimizer states only: the runs share one copy of the base model's weights.

The first step of each run is warm-up and not timed. --quick: the tiny random LLaMA, 2 steps (checks the script).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import (
    add_options,
    bench_settings,
    convert_once,
    environment,
    parse_options,
    torch_placement,
    wait_ready,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def memory_mib(pid: int) -> tuple[float, float]:
    """A process's resident memory now and its peak so far (VmRSS, VmHWM), in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def start_api(data_dir: Path, args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    """A real API process on the embedded default in `data_dir`, on a free loopback port; it and its URL."""
    from common import default_models_dir

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "TUNEFORGE_DATA_DIR": str(data_dir),
        "TUNEFORGE_MODEL_CACHE_DIR": str(vars(args).get("models_dir") or default_models_dir()),
        "TUNEFORGE_DEVICE": args.device,
        "TUNEFORGE_DTYPE": args.dtype,
        "TUNEFORGE_PORT": str(port),
        "TUNEFORGE_TINKER_MAX_RUNS": str(args.runs + 2),
        "TUNEFORGE_TINKER_MAX_RUNS_PER_TENANT": str(args.runs + 2),
        "TUNEFORGE_TINKER_MAX_SESSIONS_PER_TENANT": str(args.runs + 2),
        "TRANSFORMERS_VERBOSITY": "error",
    }
    if args.threads:
        env["TUNEFORGE_TORCH_THREADS"] = str(args.threads)
    with (data_dir / "api.log").open("wb") as log:
        api = subprocess.Popen([sys.executable, "-m", "app.cli", "api"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, api, lambda: (data_dir / "api.log").read_text()[-3000:], timeout=180)
    return api, url


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

    with tempfile.TemporaryDirectory(prefix="bench-tinker-") as tmp:
        settings = bench_settings(Path(tmp), args)
        migrate(settings.db_url)
        with session_scope(settings.db_url) as session:
            key = create_api_key(session, tenant_name="bench")
        in_process = in_process_steps(settings, args.model, args)
        print(f"in-process (the server's step code)   {in_process:9.1f} tokens/s", flush=True)
        api, url = start_api(Path(tmp), args)
        stack = contextlib.ExitStack()
        try:
            service = stack.enter_context(tinker.ServiceClient(base_url=url, api_key=f"tml-{key}"))
            idle, _ = memory_mib(api.pid)
            through_client = client_steps(service, args.model, args, seed=1)
            one_rss, one_peak = memory_mib(api.pid)
            print(f"through the tinker client             {through_client:9.1f} tokens/s")
            print(f"client / in-process: {through_client / in_process:.2f} (target >= 0.8)")
            print(f"API process: {idle:.0f} MiB before the first run; one run: peak {one_peak:.0f} MiB")

            rates: list[float] = [0.0] * args.runs
            started = time.perf_counter()

            def one(i: int) -> None:
                with tinker.ServiceClient(base_url=url, api_key=f"tml-{key}") as own:
                    rates[i] = client_steps(own, args.model, args, 10 + i)

            threads = [threading.Thread(target=one, args=(i,)) for i in range(args.runs)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.perf_counter() - started
            total = args.runs * (args.steps + 1) * args.batch * args.tokens
            many_rss, many_peak = memory_mib(api.pid)
            print(
                f"{args.runs} runs at once: {total / elapsed:9.1f} tokens/s in all, warm-up steps included "
                f"(one alone: {through_client:.1f})"
            )
            print(
                f"API process peak: {many_peak:.0f} MiB with {args.runs} runs, {one_peak:.0f} MiB with one: "
                f"{many_peak - one_peak:.0f} MiB more ({(many_peak - one_peak) / max(args.runs - 1, 1):.0f} MiB a run; "
                f"the base model's weights are held once); resident after: {many_rss:.0f} MiB"
            )
        finally:
            stack.close()  # the clients' sessions finished before the server stops
            api.terminate()
            try:
                api.wait(timeout=30)
            except subprocess.TimeoutExpired:
                api.kill()


if __name__ == "__main__":
    main()
