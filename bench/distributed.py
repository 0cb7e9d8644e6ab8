"""One job on 1 rank against the same job on 2 ranks (torchrun, gloo on a CPU; NCCL on GPUs): LoRA under DDP and
full fine-tuning under FSDP2, on the same examples, batches and seed.

Prints per method and number of ranks: tokens/s, seconds, each rank's peak resident memory and the training state
it holds (trained weights, their gradients and AdamW's moments), the last step's loss, and how far each step's
loss is from the 1-rank run's. On a 2-core CPU two ranks share the same cores: expect no speed-up. What it shows
is that the losses are the same, and that under FSDP2 each rank holds about half of the trained state.

    .venv/bin/python bench/distributed.py                 # SmolLM2-135M, 24 examples, batch 6, 1 epoch
    .venv/bin/python bench/distributed.py --model tiny-random-llama --ranks 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import add_options, command_line, convert_once, cpu_name, library_versions, parse_options  # noqa: E402

METHODS = ("lora", "full")


def measure(args: argparse.Namespace, method: str, ranks: int, folder: Path) -> dict[str, Any]:
    out = folder / f"{method}-{ranks}"
    spec = {
        "method": method,
        "out": str(out),
        "model": args.model,
        "examples": args.examples,
        "hyperparameters": {"n_epochs": 1, "batch_size": args.batch_size, "learning_rate": 1e-4},
    }
    plan = folder / f"{method}-{ranks}.plan.json"
    plan.write_text(json.dumps({"models_dir": str(args.models_dir), "runs": [spec]}))
    threads = max(1, (args.threads or os.cpu_count() or 1) // ranks)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    runner = str(ROOT / "bench" / "distributed_run.py")
    command = [sys.executable, runner, str(plan)]
    if ranks > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", runner]
        command.append(str(plan))
    subprocess.run(command, env=env, check=True, capture_output=not args.verbose)
    result: dict[str, Any] = json.loads(out.with_suffix(".json").read_text())
    result["per_rank"] = [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in range(ranks)]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser, "--model", "--models-dir", "--threads")
    parser.add_argument("--ranks", type=int, default=2, help="ranks to compare with 1 (default 2)")
    parser.add_argument("--examples", type=int, default=24, help="training examples (default 24)")
    parser.add_argument("--batch-size", type=int, default=6, help="examples per step, all ranks together")
    parser.add_argument("--verbose", action="store_true", help="show the runs' own output")
    args = parse_options(parser)
    convert_once(args.models_dir, args.model)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        for method in METHODS:
            one = measure(args, method, 1, Path(tmp))
            many = measure(args, method, args.ranks, Path(tmp))
            reference = [step["train_loss"] for step in one["steps"]]
            for result in (one, many):
                losses = [step["train_loss"] for step in result["steps"]]
                drift = max(abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=True))
                rows.append((method, result, drift))
    print(f"# {command_line()}")
    print(f"# {cpu_name()}, {os.cpu_count()} cores; {library_versions()}; model {args.model}")
    print(
        f"# {args.examples} examples, batch {args.batch_size} (all ranks together), 1 epoch; "
        "each rank 1/N of the threads"
    )
    print()
    print("| method | ranks | parallel | tokens/s | s | peak RSS per rank (MiB) | trained state per rank (MiB) "
          "| last loss | max step-loss difference vs 1 rank |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for method, result, drift in rows:
        rss = " / ".join(f"{rank['peak_rss_mib']:.0f}" for rank in result["per_rank"])
        held = " / ".join(f"{rank['held_state_mib']:.1f}" for rank in result["per_rank"])
        speed = result["trained_tokens"] / result["seconds"]
        print(
            f"| {method} | {result['ranks']} | {result['parallel']} | {speed:.0f} | {result['seconds']:.1f} | {rss} "
            f"| {held} | {result['steps'][-1]['train_loss']:.4f} | {drift:.1e} |"
        )


if __name__ == "__main__":
    main()
