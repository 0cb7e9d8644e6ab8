"""What loss the recipe trains with: supervised (token cross-entropy on the completions) or DPO (preference pairs).

The recipe owns the loop, the optimizer, checkpoints and early stopping; an objective encodes the records, runs
one step's forward and backward passes, evaluates, and says what its metrics are called. Both report the loss as
`train_loss` / `valid_loss`, so early stopping and the job's curves work the same for either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from app.ml.objectives import DPO, SFT
from app.ml.training.data import encode_examples
from app.ml.training.dpo import (
    precompute_reference,
    preference_passes,
    reference_table,
    set_references,
    without_dropout,
)
from app.ml.training.loss import accumulate_gradients, evaluation_stats
from app.ml.training.preference import encode_pairs

if TYPE_CHECKING:
    from collections.abc import Iterable

    from app.ml.training.recipe import TrainingRecipe


@dataclass
class StepResult:
    loss: float
    input_tokens: int  # real tokens fed to the model (both sides of a pair)
    metrics: dict[str, Any]  # train_loss first, then the objective's own


class Objective:
    name: str
    packs_examples: bool  # whether the recipe may pack several examples into one row
    data_parallel: bool = True  # whether its steps can be shared among ranks (app/ml/training/parallel.py)
    # Whether its rows pad little without packing (sorted by length): then a CPU's smaller micro-batch budget,
    # which packed rows get, suits them too (memory.micro_batch_budget).
    pads_little: bool = False

    def encode(self, records: Iterable[dict[str, Any]], tokenizer: Any, max_seq_length: int) -> Any:
        """A dataset: `.examples` (what steps are made of), `.n_truncated`, `.n_dropped`."""
        raise NotImplementedError

    def prepare(self, recipe: TrainingRecipe) -> None:
        """Once the model is built (and its starting weights loaded), before any state is resumed."""

    def start(self, recipe: TrainingRecipe) -> None:
        """Once setup is done (a resumed state loaded): what must exist before the first step."""

    def step(self, recipe: TrainingRecipe, examples: list[Any]) -> StepResult:
        raise NotImplementedError

    def evaluate(self, recipe: TrainingRecipe, examples: list[Any]) -> dict[str, float]:
        raise NotImplementedError

    def describe(self, evaluation: dict[str, float]) -> str:
        raise NotImplementedError

    def state_dict(self, recipe: TrainingRecipe) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, recipe: TrainingRecipe, state: dict[str, Any] | None) -> None:
        pass


class Supervised(Objective):
    name = SFT
    packs_examples = True

    def encode(self, records: Iterable[dict[str, Any]], tokenizer: Any, max_seq_length: int) -> Any:
        return encode_examples(records, tokenizer, max_seq_length)

    def step(self, recipe: TrainingRecipe, examples: list[Any]) -> StepResult:
        stats = accumulate_gradients(
            recipe.model,
            examples,
            pad_token_id=recipe.pad_token_id,
            max_batch_tokens=recipe.max_batch_tokens,
            placement=recipe.placement,
            scaler=recipe.scaler,
            extra_positions=recipe.extra_positions,
            pack=recipe.pack,
            parallel=recipe.parallel,
        )
        metrics = {"train_loss": round(stats.loss, 6), "train_token_accuracy": round(stats.accuracy, 6)}
        return StepResult(stats.loss, stats.input_tokens, metrics)

    def evaluate(self, recipe: TrainingRecipe, examples: list[Any]) -> dict[str, float]:
        stats = evaluation_stats(
            recipe.model,
            examples,
            pad_token_id=recipe.pad_token_id,
            max_batch_tokens=recipe.max_batch_tokens,
            placement=recipe.placement,
            extra_positions=recipe.extra_positions,
            pack=recipe.pack,
            parallel=recipe.parallel,
        )
        return {
            "valid_loss": round(stats.loss, 6),
            "valid_perplexity": round(math.exp(min(stats.loss, 50.0)), 4),
            "valid_token_accuracy": round(stats.accuracy, 6),
        }

    def describe(self, evaluation: dict[str, float]) -> str:
        return f"valid loss {evaluation['valid_loss']:.4f}, perplexity {evaluation['valid_perplexity']:.2f}"


class Preference(Objective):
    """DPO with `beta`; the reference is the model with its adapter off, or (`precomputed`) the model as it is
    before the first step, its log-probabilities computed once."""

    name = DPO
    packs_examples = False  # a pair's two sides are rows of their own, compared with each other
    data_parallel = False  # its passes (app/ml/training/dpo.py) run on one device
    pads_little = True  # pairs sorted by width

    def __init__(self, beta: float, *, precomputed: bool) -> None:
        self.beta = beta
        self.precomputed = precomputed

    def encode(self, records: Iterable[dict[str, Any]], tokenizer: Any, max_seq_length: int) -> Any:
        return encode_pairs(records, tokenizer, max_seq_length)

    def prepare(self, recipe: TrainingRecipe) -> None:
        if list(without_dropout(recipe.model)):
            recipe.reporter.event(
                "log", "dropout is off for DPO (as in TRL): the policy is compared with the reference"
            )

    def _datasets(self, recipe: TrainingRecipe) -> dict[str, Any]:
        found = {"train": recipe.train_data}
        if recipe.valid_data is not None:
            found["valid"] = recipe.valid_data
        return found

    def start(self, recipe: TrainingRecipe) -> None:
        if not self.precomputed:
            return
        missing = [data for data in self._datasets(recipe).values() if reference_table(data.examples) is None]
        if not missing:  # resumed: the checkpoint's, not computed again from weights that have trained since
            return
        training = recipe.model.training
        recipe.model.eval()
        try:
            for data in missing:
                precompute_reference(
                    recipe.model,
                    data.examples,
                    pad_token_id=recipe.pad_token_id,
                    max_batch_tokens=recipe.max_batch_tokens,
                    split_head=recipe.split_head,
                    placement=recipe.placement,
                    extra_positions=recipe.extra_positions,
                )
        finally:
            recipe.model.train(training)
        n = sum(len(data.examples) for data in missing)
        recipe.reporter.event("log", f"reference log-probabilities computed once for {n} preference pairs")

    def step(self, recipe: TrainingRecipe, examples: list[Any]) -> StepResult:
        stats = preference_passes(
            recipe.model,
            examples,
            beta=self.beta,
            pad_token_id=recipe.pad_token_id,
            max_batch_tokens=recipe.max_batch_tokens,
            split_head=recipe.split_head,
            placement=recipe.placement,
            extra_positions=recipe.extra_positions,
            scaler=recipe.scaler,
        )
        return StepResult(stats.loss, stats.input_tokens, stats.metrics("train"))

    def evaluate(self, recipe: TrainingRecipe, examples: list[Any]) -> dict[str, float]:
        stats = preference_passes(
            recipe.model,
            examples,
            beta=self.beta,
            pad_token_id=recipe.pad_token_id,
            max_batch_tokens=recipe.max_batch_tokens,
            split_head=recipe.split_head,
            placement=recipe.placement,
            extra_positions=recipe.extra_positions,
            backward=False,
        )
        return stats.metrics("valid")

    def describe(self, evaluation: dict[str, float]) -> str:
        return (
            f"valid loss {evaluation['valid_loss']:.4f}, reward margin {evaluation['valid_rewards_margins']:.4f}, "
            f"preference accuracy {evaluation['valid_rewards_accuracies']:.2f}"
        )

    def state_dict(self, recipe: TrainingRecipe) -> dict[str, Any] | None:
        if not self.precomputed:
            return None
        return {"reference": {name: reference_table(data.examples) for name, data in self._datasets(recipe).items()}}

    def load_state_dict(self, recipe: TrainingRecipe, state: dict[str, Any] | None) -> None:
        if not self.precomputed or not state:
            return
        datasets = self._datasets(recipe)
        for name, table in state["reference"].items():
            if table is not None and name in datasets:
                set_references(datasets[name].examples, table)


def objective_for(name: str, hyperparameters: Any, *, precomputed_reference: bool) -> Objective:
    """The objective a job trains with; `precomputed_reference`: DPO's reference computed once before training
    (the method has no adapter to switch off, or the job starts from fine-tuned weights)."""
    if name == DPO:
        return Preference(float(hyperparameters.beta), precomputed=precomputed_reference)
    return Supervised()
