"""The training recipe on its own, as a plain script runs it: no HTTP, no database, no object store, an in-memory
reporter (what method tests build on)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from app.core.settings import Settings
from app.jobs.state import JobCancelled
from app.ml.device import Placement, resolve_placement
from app.ml.methods import METHODS
from app.ml.methods.base import MethodContext
from app.ml.models import BUILTINS, ModelStore
from app.ml.training import Checkpointer, TrainingRecipe, training_base_model
from worker.training import recipe_limits

TINY = BUILTINS["tiny-random-llama"]


@dataclass
class MemoryReporter:
    """Keeps what a recipe reports; `cancel_after_step` makes it cancel the job like a user would."""

    events: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    cancel_after_step: int | None = None

    def event(self, type_: str, message: str, data: dict[str, Any] | None = None, level: str = "info") -> None:
        self.events.append((type_, message, data or {}))

    def placement(self, placement: Placement) -> None:
        self.event("log", f"training on {placement.describe()}", {"dtype": placement.dtype_str})

    def progress(
        self, *, step: int, total_steps: int, epoch: int, metrics: dict[str, Any], message: str, type_: str = "metrics"
    ) -> None:
        self.event(type_, message, {"step": step, "epoch": epoch, **metrics})
        if self.cancel_after_step is not None and step >= self.cancel_after_step:
            raise JobCancelled("cancelled")

    def check_cancelled(self) -> None:
        pass

    def of_type(self, type_: str) -> list[dict[str, Any]]:
        return [data for kind, _, data in self.events if kind == type_]


def recipe_for(
    model_cache_dir: Path,
    reporter: MemoryReporter,
    validation: str | None = "plum",
    method: str = "lora",
    checkpointer: Checkpointer | None = None,
    **hyperparameters: Any,
) -> TrainingRecipe:
    """A `method` recipe on 8 examples teaching "plum", validated on the same prompt answered `validation` (or
    not), with the worker's limits (the settings' defaults)."""
    models = ModelStore(model_cache_dir, None)
    context = MethodContext(record=TINY, models=models, placement=resolve_placement("auto", "auto"))

    def examples(word: str) -> list[dict[str, str]]:
        return [{"prompt": "The secret word is", "completion": f" {word}"}] * 8

    chosen = METHODS[method]
    return TrainingRecipe(
        chosen,
        chosen.hyperparameters.model_validate(hyperparameters).for_model(TINY),
        model=training_base_model(chosen, context),
        tokenizer=models.tokenizer(TINY),
        context=context,
        train=examples("plum"),
        valid=examples(validation) if validation else None,
        reporter=reporter,
        limits=recipe_limits(Settings()),
        checkpointer=checkpointer,
    )


def test_the_recipe_trains_reports_and_exports_without_a_database(tmp_path: Path, model_cache_dir: Path) -> None:
    reporter = MemoryReporter()
    recipe = recipe_for(model_cache_dir, reporter, n_epochs=4, learning_rate=0.05, target_modules="all-linear")
    recipe.setup()
    pristine = {k: v.clone() for k, v in ModelStore(model_cache_dir, None).load(TINY).state_dict().items()}
    metrics = recipe.train()
    losses = [data["train_loss"] for data in reporter.of_type("metrics")]
    assert len(losses) == 8 and losses[-1] < losses[0] / 2  # 8 examples / batch 4 x 4 epochs; it learns
    evaluations = [data["valid_loss"] for data in reporter.of_type("eval")]
    assert len(evaluations) == 4 and metrics["valid_loss"] == evaluations[-1] < evaluations[0]
    assert reporter.events[0][1].startswith("training on cpu (")
    # Only LoRA's weights trained: every base weight is as it was.
    merged = recipe.model.get_base_model().state_dict()  # type: ignore[operator]
    for name, tensor in pristine.items():
        wrapped = name.replace(".weight", ".base_layer.weight")
        assert torch.equal(merged.get(wrapped, merged.get(name)), tensor), name
    folder = tmp_path / "adapter"
    folder.mkdir()
    recipe.export(folder)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in folder.iterdir()}


def test_a_cancelled_job_stops_at_its_next_step(model_cache_dir: Path) -> None:
    reporter = MemoryReporter(cancel_after_step=2)
    recipe = recipe_for(model_cache_dir, reporter, n_epochs=4)
    recipe.setup()
    with pytest.raises(JobCancelled):
        recipe.train()
    assert [data["step"] for data in reporter.of_type("metrics")] == [1, 2]


def test_gradient_accumulation_cosine_schedule_and_evaluation_every_n_steps(model_cache_dir: Path) -> None:
    reporter = MemoryReporter()
    recipe = recipe_for(
        model_cache_dir,
        reporter,
        n_epochs=3,
        batch_size=2,
        gradient_accumulation_steps=2,
        lr_scheduler="cosine",
        warmup_ratio=0.0,
        eval_every=1,
        learning_rate=0.01,
    )
    recipe.setup()
    recipe.train()
    steps = reporter.of_type("metrics")
    assert [d["step"] for d in steps] == [1, 2, 3, 4, 5, 6]  # 8 examples, 2 x 2 per optimizer step, 3 epochs
    rates = [d["learning_rate"] for d in steps]
    expected = [0.01 * 0.5 * (1 + math.cos(math.pi * s / 6)) for s in range(6)]
    assert rates == pytest.approx(expected)
    assert [d["step"] for d in reporter.of_type("eval")] == [1, 2, 3, 4, 5, 6]  # each step; none twice at epoch end


def test_validation_split_holds_out_training_examples(model_cache_dir: Path) -> None:
    reporter = MemoryReporter()
    recipe = recipe_for(model_cache_dir, reporter, validation=None, validation_split=0.25, n_epochs=1)
    recipe.setup()
    assert (len(recipe.train_data.examples), len(recipe.valid_data.examples)) == (6, 2)  # type: ignore[union-attr]
    assert any("2 of 8 training examples held out" in message for _, message, _ in reporter.events)
    recipe.train()
    assert len(reporter.of_type("eval")) == 1


def test_early_stopping_stops_and_keeps_the_best_evaluations_weights(model_cache_dir: Path) -> None:
    """Trained on "plum" and validated on "kiwi": the validation loss rises once the model is sure of "plum", so
    training stops, and the published weights are those of the best evaluation, not the last."""
    reporter = MemoryReporter()
    recipe = recipe_for(
        model_cache_dir,
        reporter,
        validation="kiwi",
        n_epochs=20,
        learning_rate=0.05,
        target_modules="all-linear",
        early_stopping_patience=2,
    )
    recipe.setup()
    metrics = recipe.train()
    evaluations = {d["step"]: d["valid_loss"] for d in reporter.of_type("eval")}
    [summary] = reporter.of_type("early_stopping")
    assert summary["stopped_early"] is True and max(evaluations) < recipe.total_steps
    assert summary["best_valid_loss"] == min(evaluations.values())
    assert evaluations[summary["best_step"]] == summary["best_valid_loss"]
    # The two evaluations after the best one were worse, and then it stopped.
    after = [loss for step, loss in sorted(evaluations.items()) if step > summary["best_step"]]
    assert len(after) == 2 and all(loss > summary["best_valid_loss"] for loss in after)
    assert metrics["best_step"] == summary["best_step"]
    # What is published is the best evaluation's model: evaluating it again gives the best loss.
    assert recipe.evaluate(recipe.valid_data)["valid_loss"] == pytest.approx(summary["best_valid_loss"], abs=1e-5)  # type: ignore[arg-type]
