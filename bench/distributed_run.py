"""Training runs as `torchrun` starts them (several ranks) or as one process, for bench/distributed.py and
tests/test_distributed.py: `python -m torch.distributed.run --nproc-per-node 2 bench/distributed_run.py RUNS.json`,
or `run(...)` in-process.

Each run trains a method on examples of varied lengths (so the ranks' shares split into different numbers of
micro-batches) and writes, from rank 0, its per-step losses, evaluations and timing (`<out>.json`), its trained
tensors whole (`<out>.safetensors`) and, when stopped early, its checkpoint state (`<out>.pt`); every rank writes
its peak resident memory and the training state it holds (`<out>.rank<N>.json`).
"""

from __future__ import annotations

import dataclasses
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from app.ml.device import resolve_placement
from app.ml.methods import METHODS
from app.ml.methods.base import MethodContext
from app.ml.models import BUILTINS, ModelStore
from app.ml.training import RecipeLimits, StopRequested, TrainingRecipe, training_base_model
from app.ml.training.parallel import from_environment
from bench.common import BenchReporter

WORDS = ["plum", "pear", "fig", "kiwi", "lime", "date"]


class StateKeeper:
    """The recipe's checkpointer: keeps its latest state in memory (every rank takes part in gathering it)."""

    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None

    def save(self, recipe: TrainingRecipe) -> None:
        self.state = recipe.state_dict()
        recipe.export(None)  # as a job's checkpoint does: its artifact's weights gathered too


def examples(n: int = 24) -> list[dict[str, str]]:
    """Prompts of 1 to 12 repeated words: different lengths, so that micro-batches differ from rank to rank."""
    return [
        {"prompt": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + i % 12)), "completion": f" {WORDS[i % 6]}"}
        for i in range(n)
    ]


def held_bytes(recipe: TrainingRecipe) -> int:
    """The training state this rank holds: trained weights, their gradients and AdamW's moments (a shard of each,
    sharded)."""
    total = 0
    for param in recipe.trainable_params:
        tensors = [param, param.grad, *recipe.optimizer.state.get(param, {}).values()]
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
                total += local.numel() * local.element_size()
    return total


def run(spec: dict[str, Any], models_dir: Path) -> None:
    """One run: `spec` has `method`, `out` (a path without suffix), optional `model` (a built-in, default the tiny
    one), `examples` (24), `stop_after` (steps), `resume` (a state file), `hyperparameters`, `export` (write the
    artifact to `<out>.artifact/`)."""
    record = BUILTINS[spec.get("model", "tiny-random-llama")]
    placement = resolve_placement("cpu", "float32")
    method = METHODS[spec["method"]]
    parallel = from_environment(placement.device, sharded=spec.get("sharded", method.name == "full"))
    models = ModelStore(models_dir, None)
    context = MethodContext(record=record, models=models, placement=placement)
    hyperparameters = {
        "n_epochs": 2,
        "batch_size": 6,
        "learning_rate": 0.01,
        "seed": 3,
        **spec.get("hyperparameters", {}),
    }
    if method.name == "lora":
        hyperparameters.setdefault("lora_dropout", 0.0)
    stop_after = spec.get("stop_after")
    reporter, keeper = BenchReporter(spec["out"]), StateKeeper()
    recipe = TrainingRecipe(
        method,
        method.hyperparameters.model_validate(hyperparameters).for_model(record),
        model=training_base_model(method, dataclasses.replace(context, placement=parallel.load_placement(placement))),
        tokenizer=models.tokenizer(record),
        context=context,
        train=examples(spec.get("examples", 24)),
        valid=examples(8),
        reporter=reporter,
        # 96 tokens a micro-batch: a step's 6 examples take several, and 2 ranks' shares different counts.
        limits=RecipeLimits(max_batch_tokens=96, checkpoint_minutes=60, log_every_steps=100),
        checkpointer=keeper,
        stop=(lambda: len(reporter.of_type("metrics")) >= stop_after) if stop_after else (lambda: False),
        parallel=parallel,
    )
    resume = torch.load(spec["resume"], weights_only=True) if spec.get("resume") and parallel.is_first else None
    recipe.setup(resume=resume)
    started = time.perf_counter()  # training only: the model's loading is not what ranks change
    try:
        recipe.train()
        stopped = False
    except StopRequested:
        stopped = True
    seconds = time.perf_counter() - started
    out = Path(spec["out"])
    rank_file = out.with_suffix(f".rank{parallel.rank}.json")
    rank_file.write_text(
        json.dumps(
            {
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "held_state_mib": held_bytes(recipe) / 2**20,
            }
        )
    )
    trained = recipe.trainable_state()
    if spec.get("export"):  # the artifact as a job publishes it: every rank takes part, rank 0 writes
        folder = out.with_suffix(".artifact")
        if parallel.is_first:
            folder.mkdir()
        recipe.export(folder if parallel.is_first else None)
    if not parallel.is_first:
        return
    if stopped and keeper.state is not None:
        torch.save(keeper.state, out.with_suffix(".pt"))
    from safetensors.torch import save_file

    save_file({name: tensor.contiguous() for name, tensor in trained.items()}, str(out.with_suffix(".safetensors")))
    steps = reporter.of_type("metrics")
    tokens = sum(step["trained_tokens"] for step in steps[-1:])
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "ranks": parallel.world_size,
                "parallel": parallel.describe(),
                "steps": steps,
                "evaluations": reporter.of_type("eval"),
                "stopped": stopped,
                "seconds": seconds,
                "trained_tokens": tokens,
                "trainable_numel": sum(t.numel() for t in trained.values()),
            }
        )
    )


def main() -> None:
    runs = json.loads(Path(sys.argv[1]).read_text())
    for spec in runs["runs"]:
        run(spec, Path(runs["models_dir"]))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
