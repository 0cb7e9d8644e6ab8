"""bench/methods.py as a sweep: the same methods, learning rates and data, trained as one sweep through the real
processes, with and without early elimination, in the same run.

    .venv/bin/python bench/sweep.py [--model smollm2-135m-instruct] [--methods lora,ia3,...] [--epochs 1]
                                    [--eta 2] [--min-steps N] [--threads 2]

Each sweep gets a fresh `tuneforge up` (its API and its worker, on the embedded default, in a temporary data dir),
bench/data/greetings_train.jsonl (200 chats that answer with the pirate greeting "Ahoy!") and, as the validation
file, bench/data/greetings_heldout.jsonl; then `POST /sweeps` with one configuration per method (bench/methods.py's
hyperparameters: batch 8, max_seq_length 128, seed 42, its learning rates) and `max_parallel` 1 (one worker). It
runs twice: with asynchronous successive halving (rungs at --min-steps, default a quarter of the steps, then twice
as many, up to half the steps) and with `"early_elimination": {"rule": "none"}`. Each sweep's wall time runs from
`POST /sweeps` to its end (polled every 0.5 s); its steps are the optimizer steps its jobs trained. It prints both
ranked tables (as `GET /sweeps/{id}` answers them), then the comparison: wall time, steps, the saving, and whether
both sweeps chose the same winner (exit code 1 if not). The end of the output is Markdown for BENCHMARKS.md.

On 2 CPU cores the default run (9 methods, one epoch of 25 steps each, twice) takes about 20 minutes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import add_options, command_line, convert_once, cpu_name, parse_options, tuneforge_command, tuneforge_up
from methods import HELDOUT_FILE, ORDER, TRAIN_FILE, hyperparameters_for, skip_reason

from app.ml.methods import METHODS

POLL_SECONDS = 0.5


def sweep(api: Any, body: dict[str, Any]) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    created = api.post("/sweeps", json=body)
    assert created.status_code == 201, created.text
    sweep_id = created.json()["id"]
    while True:
        answer = api.get(f"/sweeps/{sweep_id}").json()
        if answer["status"] != "running":
            return answer, time.perf_counter() - started
        time.sleep(POLL_SECONDS)


def run_sweep(
    args: argparse.Namespace, env: dict[str, str], names: list[str], elimination: dict[str, Any]
) -> tuple[dict[str, Any], float]:
    """The sweep on a `tuneforge up` of its own (a fresh data dir, a worker that has trained nothing yet), as a user
    runs it: upload both files, POST /sweeps, poll until it ends."""
    import httpx

    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp, tuneforge_up(Path(tmp), env, show_log=False) as up:
        key = subprocess.run(
            [*tuneforge_command(), "keys", "create", "--tenant", "bench"],
            env={**os.environ, "TUNEFORGE_DATA_DIR": tmp, **env},
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        with httpx.Client(base_url=up[0], headers={"Authorization": f"Bearer {key}"}, timeout=120) as api:
            files = {}
            for name, path in (("train", TRAIN_FILE), ("valid", HELDOUT_FILE)):
                r = api.post(
                    "/v1/files",
                    data={"purpose": "fine-tune", "base_model": args.model},
                    files={"file": (path.name, path.read_bytes())},
                )
                assert r.status_code == 201, r.text
                files[name] = r.json()["id"]
            body = {
                "name": "bench/methods.py as a sweep",
                "base_model": args.model,
                "training_file": files["train"],
                "validation_file": files["valid"],
                "configurations": [
                    {"method": name, "hyperparameters": hyperparameters_for(name, args)} for name in names
                ],
                "budget": {"max_parallel": 1},
                "early_elimination": elimination,
            }
            return sweep(api, body)


def table(answer: dict[str, Any]) -> list[str]:
    lines = [
        "| rank | method | valid loss | stopped at | steps | trainable params | peak RSS (worker) | tokens/s "
        "| wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in answer["results"]:
        peak = f"{r['peak_memory_bytes'] / 2**20:,.0f} MiB" if r["peak_memory_bytes"] else "-"
        objective = f"{r['objective']:.4f}" if r["objective"] is not None else "-"
        lines.append(
            f"| {r['rank'] or '-'} | {r['method']} | {objective} | {r['stopped_at_step'] or ''} | "
            f"{r['steps']}/{r['planned_steps']} | {r['trainable_parameters']:,} | {peak} | "
            f"{r['tokens_per_second'] or 0:,.0f} | {r['wall_seconds'] or 0:.1f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser, "--model")
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: bench/methods.py's)")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs of every method (default: 1)")
    parser.add_argument("--eta", type=int, default=2, help="successive halving's eta (default: 2)")
    parser.add_argument("--min-steps", type=int, default=None, help="the first rung (default: a quarter of the steps)")
    add_options(parser, "--device", "--threads", "--models-dir")
    args = parse_options(parser)
    args.learning_rates, args.eval_every = {}, None
    names = (
        [m for m in ORDER if m in METHODS]
        if args.methods is None
        else [m.strip() for m in args.methods.split(",") if m.strip()]
    )
    names = [name for name in names if skip_reason(name, args.device) is None]
    convert_once(args.models_dir, args.model)
    env = {
        "TUNEFORGE_MODEL_CACHE_DIR": str(args.models_dir),
        "TUNEFORGE_DEVICE": args.device,
        "TUNEFORGE_LOG_LEVEL": "WARNING",
        "TUNEFORGE_LOG_FORMAT": "text",
        **({"TUNEFORGE_TORCH_THREADS": str(args.threads)} if args.threads else {}),
    }
    answers: dict[str, tuple[dict[str, Any], float]] = {}
    rule = {"rule": "successive_halving", "eta": args.eta, "min_steps": args.min_steps}
    for label, elimination in (("with", rule), ("without", {"rule": "none"})):
        print(f"sweep {label} early elimination: running ...", flush=True)
        answers[label] = run_sweep(args, env, names, elimination)
        print(f"sweep {label} early elimination: done in {answers[label][1]:.0f} s", flush=True)
    with_, without = answers["with"], answers["without"]
    out = [
        "",
        f"command: {command_line()}",
        f"machine: {cpu_name()}, {os.cpu_count()} CPUs; model {args.model}; {len(names)} methods, "
        f"{args.epochs} epoch(s) each, one worker (max_parallel 1)",
        "",
    ]
    for label, (answer, seconds) in answers.items():
        out.append(
            f"### {label} early elimination ({answer['early_elimination']['rule']}"
            + (
                f", eta {answer['early_elimination']['eta']}, rungs at steps {answer['rungs']}"
                if answer["rungs"]
                else ""
            )
            + f"): {seconds:.0f} s, {answer['savings']['steps_trained']} steps"
        )
        out.append("")
        out.extend(table(answer))
        out.append("")
    same = with_[0]["winner"] is not None and without[0]["winner"] is not None
    same = same and with_[0]["winner"]["method"] == without[0]["winner"]["method"]
    steps_with, steps_without = with_[0]["savings"]["steps_trained"], without[0]["savings"]["steps_trained"]
    out += [
        "| sweep | wall time | steps trained | winner | winner's valid loss |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| {label} elimination | {seconds:.0f} s | {answer['savings']['steps_trained']} | "
            f"{answer['winner']['method'] if answer['winner'] else '-'} | "
            f"{answer['winner']['objective'] if answer['winner'] else float('nan'):.4f} |"
            for label, (answer, seconds) in answers.items()
        ),
        "",
        f"elimination: {steps_with} steps instead of {steps_without} ({1 - steps_with / max(1, steps_without):.0%} "
        f"fewer), wall time {with_[1]:.0f} s instead of {without[1]:.0f} s ({with_[1] / without[1]:.2f}x); "
        f"same winner: {'yes' if same else 'NO'}",
    ]
    print("\n".join(out), flush=True)
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
