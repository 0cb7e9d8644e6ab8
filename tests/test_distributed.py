"""One run across several ranks (`torchrun`, the gloo backend on this CPU): LoRA under DDP and full fine-tuning
under FSDP2 train as one process does, and a checkpoint of N ranks resumes on M. (Jobs on 2 devices through the
real processes: tests/test_faults.py.)

Tolerances: float32 sums taken in another order (each rank's share, then the ranks') differ in the last bits.
Losses agree within 1e-5 relative. Trained tensors: LoRA's within 1e-6 absolute; full fine-tuning's within 1e-4
(Adam moves a weight by about the learning rate, 0.01 here, whatever its gradient's size, so a last-bit difference
in a near-zero gradient shows at that scale: 2e-5 measured after 8 steps).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from app.ml.device import resolve_placement
from app.ml.serving.kinds.delta import CONFIG, TENSORS
from app.ml.training.parallel import shards
from bench import distributed_run

pytestmark = pytest.mark.slow  # starts torchrun and its ranks

ROOT = Path(__file__).resolve().parent.parent
LOSS_RTOL = 1e-5
WEIGHT_ATOL = {"lora": 1e-6, "full": 1e-4}


def torchrun(runs: list[dict[str, Any]], models_dir: Path, tmp_path: Path, ranks: int = 2) -> None:
    plan = tmp_path / "runs.json"
    plan.write_text(json.dumps({"models_dir": str(models_dir), "runs": runs}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
         str(ROOT / "bench" / "distributed_run.py"), str(plan)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def result(out: Path) -> dict[str, Any]:
    return json.loads(out.with_suffix(".json").read_text())  # type: ignore[no-any-return]


def losses(out: Path) -> list[float]:
    return [step["train_loss"] for step in result(out)["steps"]]


def assert_same_run(a: Path, b: Path, *, from_step: int = 0) -> None:
    """The same per-step losses (`b` resumed after `from_step` of `a`'s steps), evaluations and trained tensors."""
    first, second = losses(a)[from_step:], losses(b)
    assert len(first) == len(second) > 0
    assert first == pytest.approx(second, rel=LOSS_RTOL)
    first_eval = [e["valid_loss"] for e in result(a)["evaluations"]]
    second_eval = [e["valid_loss"] for e in result(b)["evaluations"]]
    assert first_eval[-1] == pytest.approx(second_eval[-1], rel=LOSS_RTOL)
    tensors, others = load_file(str(a.with_suffix(".safetensors"))), load_file(str(b.with_suffix(".safetensors")))
    assert tensors.keys() == others.keys()
    atol = WEIGHT_ATOL[a.name.split("-")[0]]
    for name, tensor in tensors.items():
        gap = float((tensor - others[name]).abs().max())
        assert gap <= atol, f"{name}: trained tensors {gap:.1e} apart"


def test_two_ranks_train_as_one_process_and_resume_on_any_number(tmp_path: Path, model_cache_dir: Path) -> None:
    at = tmp_path.joinpath
    # One process: the references, and a LoRA run stopped (checkpointed) after 3 of its 8 steps.
    for spec in (
        {"method": "lora", "out": str(at("lora-1"))},
        {"method": "full", "out": str(at("full-1")), "export": True},
        {"method": "lora", "out": str(at("lora-1-stopped")), "stop_after": 3},
    ):
        distributed_run.run(spec, model_cache_dir)
    # Two ranks: LoRA (DDP) and full (FSDP2) from the start; full stopped after 3 steps; LoRA resumed 1 -> 2.
    torchrun(
        [
            {"method": "lora", "out": str(at("lora-2"))},
            {"method": "full", "out": str(at("full-2")), "export": True},
            # LoRA over a sharded base model, as on a base model too large for one GPU.
            {"method": "lora", "out": str(at("lora-2-sharded")), "sharded": True},
            {"method": "full", "out": str(at("full-2-stopped")), "stop_after": 3},
            {"method": "lora", "out": str(at("lora-1-then-2")), "resume": str(at("lora-1-stopped.pt"))},
        ],
        model_cache_dir,
        tmp_path,
    )
    # FSDP2's checkpoint (gathered whole, keyed as one process keys it) resumed by one process: 2 -> 1.
    distributed_run.run(
        {"method": "full", "out": str(at("full-2-then-1")), "resume": str(at("full-2-stopped.pt"))}, model_cache_dir
    )

    assert result(at("lora-2"))["parallel"] == "DDP over 2 ranks (gloo)"
    assert result(at("full-2"))["parallel"] == "FSDP2 over 2 ranks (gloo)"
    assert len(losses(at("lora-1"))) == 8  # 24 examples, batch 6, 2 epochs
    assert_same_run(at("lora-1"), at("lora-2"))
    assert_same_run(at("full-1"), at("full-2"))
    assert result(at("lora-2-sharded"))["parallel"] == "FSDP2 over 2 ranks (gloo)"
    assert_same_run(at("lora-1"), at("lora-2-sharded"))
    # FSDP2's artifact, gathered from the shards, is a single process's: the same files, the same tensors.
    one, two = at("full-1.artifact"), at("full-2.artifact")
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir()) == sorted([CONFIG, TENSORS])
    assert (one / CONFIG).read_text() == (two / CONFIG).read_text()
    exported, exported_too = load_file(str(one / TENSORS)), load_file(str(two / TENSORS))
    assert exported.keys() == exported_too.keys() and len(exported) == 20  # every tensor of the tiny model
    for name, tensor in exported.items():
        assert float((tensor - exported_too[name]).abs().max()) <= WEIGHT_ATOL["full"], name
    for stopped in ("lora-1-stopped", "full-2-stopped"):
        assert result(at(stopped))["stopped"] and len(losses(at(stopped))) == 3
    # Resumed on another number of ranks, each run ends where the uninterrupted one does, step for step.
    assert [s["step"] for s in result(at("lora-1-then-2"))["steps"]] == [4, 5, 6, 7, 8]
    assert_same_run(at("lora-1"), at("lora-1-then-2"), from_step=3)
    assert [s["step"] for s in result(at("full-2-then-1"))["steps"]] == [4, 5, 6, 7, 8]
    assert_same_run(at("full-1"), at("full-2-then-1"), from_step=3)


def test_full_fine_tuning_is_sharded_and_on_a_cpu_nothing_else() -> None:
    cpu = resolve_placement("cpu", "float32")
    assert shards(trains_every_weight=True, n_parameters=1, placement=cpu)
    # Only a GPU's memory can be too small for a base model: a CPU's ranks replicate it (DDP).
    assert not shards(trains_every_weight=False, n_parameters=10**12, placement=cpu)
