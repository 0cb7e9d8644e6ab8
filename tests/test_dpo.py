"""DPO on its own, as the recipe computes it: the loss, rewards and gradients equal TRL's `DPOTrainer` on the same
batch (its reference from the adapter switched off, or precomputed once), and training moves the preference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from trl import DPOConfig, DPOTrainer

from app.core.settings import Settings
from app.ml.device import resolve_placement
from app.ml.formatting import IGNORE_INDEX
from app.ml.methods import METHODS
from app.ml.methods.base import MethodContext
from app.ml.models import BUILTINS, ModelStore, pad_token_id
from app.ml.objectives import hyperparameters_class
from app.ml.training import TrainingRecipe, training_base_model
from app.ml.training.dpo import precompute_reference, preference_passes
from app.ml.training.preference import PreferencePair, collate_pairs, encode_pairs, pair_micro_batches
from tests.test_lifecycle import Interrupted, MemoryCheckpoints
from tests.test_recipe import MemoryReporter, recipe_for
from worker.training import recipe_limits

TINY = BUILTINS["tiny-random-llama"]
BETA = 0.3


def preference_line(question: str, preferred: str, non_preferred: str) -> dict[str, Any]:
    return {
        "input": {"messages": [{"role": "user", "content": question}]},
        "preferred_output": [{"role": "assistant", "content": preferred}],
        "non_preferred_output": [{"role": "assistant", "content": non_preferred}],
    }


LINES = [
    preference_line("What color is the sky?", "Blue, mostly, on a clear day.", "Red"),
    preference_line("Two plus two?", "Four", "Five, and surely not four at all"),
    preference_line("Name a fruit", "An apple", "A brick"),
]


def trl_inputs(pairs: list[PreferencePair], pad: int) -> dict[str, torch.Tensor]:
    """The batch as TRL's collator hands it to `_compute_loss`: chosen rows then rejected rows, and a
    `completion_mask` over the output's tokens (our labels)."""
    batch = collate_pairs(pairs, pad)
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "completion_mask": (batch["labels"] != IGNORE_INDEX).long(),
    }


def trl_trainer(
    tmp_path: Path, model: Any, tokenizer: Any, peft_config: LoraConfig | None = None, **config: Any
) -> DPOTrainer:
    dataset = Dataset.from_list([{"prompt": "Hi", "chosen": " there", "rejected": " no"}])
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=BETA,
        loss_type=["sigmoid"],
        report_to=[],
        use_cpu=True,
        bf16=False,
        **config,
    )
    return DPOTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )


def trainable_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("split_head", [True, False], ids=["output-layer-apart", "whole-model"])
def test_loss_rewards_and_gradients_equal_trl_with_the_adapter_off_as_reference(
    tmp_path: Path, model_cache_dir: Path, split_head: bool
) -> None:
    models = ModelStore(model_cache_dir, None)
    tokenizer = models.tokenizer(TINY)
    torch.manual_seed(0)
    # A LoRA whose B is not zero: the policy differs from the base (the reference) from the start.
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    trainer = trl_trainer(tmp_path, models.load(TINY), tokenizer, peft_config=config)
    model = trainer.model
    model.eval()
    pairs = encode_pairs(LINES, tokenizer, 512).examples
    pad = pad_token_id(tokenizer)

    trl_loss = trainer._compute_loss(model, trl_inputs(pairs, pad), return_outputs=False)
    trl_loss.backward()
    trl_grads = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    trl_metrics = {name: values[-1] for name, values in trainer._metrics["eval"].items()}

    # Two pairs to a micro-batch: the step's gradients are still those of the mean over all three.
    ours = preference_passes(model, pairs, beta=BETA, pad_token_id=pad, max_batch_tokens=80, split_head=split_head)
    assert len(pair_micro_batches(pairs, 80)) > 1
    assert abs(ours.loss - trl_loss.item()) < 1e-5
    assert abs(ours.loss - 0.693147) > 0.01  # not the trivial log 2 of a policy equal to its reference
    metrics = ours.metrics("train")
    for theirs, mine in (
        ("rewards/chosen", "train_rewards_chosen"),
        ("rewards/rejected", "train_rewards_rejected"),
        ("rewards/margins", "train_rewards_margins"),
        ("rewards/accuracies", "train_rewards_accuracies"),
    ):
        assert abs(metrics[mine] - trl_metrics[theirs]) < 1e-5, mine
    grads = trainable_grads(model)
    assert grads.keys() == trl_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, trl_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_precomputed_reference_and_loss_equal_trl(tmp_path: Path, model_cache_dir: Path) -> None:
    """Full fine-tuning's reference: computed once from the model before training (TRL's precompute_ref_log_probs)."""
    models = ModelStore(model_cache_dir, None)
    tokenizer = models.tokenizer(TINY)
    model = models.load(TINY)
    model.eval()
    pairs = encode_pairs(LINES, tokenizer, 512).examples
    pad = pad_token_id(tokenizer)
    trainer = trl_trainer(tmp_path, model, tokenizer, precompute_ref_log_probs=True)
    precompute_reference(model, pairs, pad_token_id=pad, max_batch_tokens=2048, split_head=True)
    inputs = trl_inputs(pairs, pad)
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(model, inputs)
    ours = torch.tensor([p.reference for p in pairs])
    torch.testing.assert_close(ours[:, 0], ref_chosen.float(), rtol=0, atol=1e-4)
    torch.testing.assert_close(ours[:, 1], ref_rejected.float(), rtol=0, atol=1e-4)

    with torch.no_grad():  # a step of training later: the policy has moved away from the reference
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    inputs |= {"ref_chosen_logps": ours[:, 0], "ref_rejected_logps": ours[:, 1]}
    trl_loss = trainer._compute_loss(model, inputs, return_outputs=False).item()
    ours_loss = preference_passes(
        model, pairs, beta=BETA, pad_token_id=pad, max_batch_tokens=2048, split_head=True, backward=False
    ).loss
    assert abs(ours_loss - trl_loss) < 1e-5
    assert abs(ours_loss - 0.693147) > 0.01


def dpo_recipe(
    model_cache_dir: Path, reporter: MemoryReporter, method: str, train: list[dict[str, Any]], **hp: Any
) -> TrainingRecipe:
    models = ModelStore(model_cache_dir, None)
    context = MethodContext(record=TINY, models=models, placement=resolve_placement("auto", "auto"))
    chosen = METHODS[method]
    return TrainingRecipe(
        chosen,
        hyperparameters_class(method, "dpo").model_validate(hp).for_model(TINY),
        model=training_base_model(chosen, context),
        tokenizer=models.tokenizer(TINY),
        context=context,
        train=train,
        valid=None,
        reporter=reporter,
        limits=recipe_limits(Settings()),
        objective="dpo",
    )


@pytest.mark.parametrize("method", ["ia3", "head"])
def test_dpo_trains_with_other_methods_and_reports_trl_metrics(model_cache_dir: Path, method: str) -> None:
    """An adapter method (reference: adapter off) and a weight-delta one (reference precomputed): the loss falls
    from log 2 and the chosen output's reward rises above the rejected one's."""
    train = [preference_line(f"Pick a color ({i})", "blue", "red") for i in range(8)]
    reporter = MemoryReporter()
    recipe = dpo_recipe(model_cache_dir, reporter, method, train, n_epochs=2, learning_rate=0.05, validation_split=0.25)
    recipe.setup()
    metrics = recipe.train()
    steps = reporter.of_type("metrics")
    assert steps[0]["train_loss"] == pytest.approx(0.693147, abs=1e-4)  # policy == reference at the first step
    assert steps[-1]["train_loss"] < 0.6 and metrics["valid_loss"] < 0.6
    assert metrics["train_rewards_margins"] > 0 and metrics["valid_rewards_accuracies"] == 1.0
    assert metrics["train_rewards_margins"] == pytest.approx(
        metrics["train_rewards_chosen"] - metrics["train_rewards_rejected"], abs=1e-5
    )
    precomputed = any("reference log-probabilities computed once" in message for _, message, _ in reporter.events)
    assert precomputed == (method == "head")


@pytest.mark.parametrize("method", ["lora", "head"])
def test_a_run_that_starts_from_a_fine_tuned_artifact_has_its_weights_and_it_as_reference(
    tmp_path: Path, model_cache_dir: Path, method: str
) -> None:
    """SFT, then DPO from the SFT artifact (PEFT: its adapter loaded into the fresh one; delta: applied): the DPO
    run starts with the SFT weights, and its reference is them (computed once), so its first loss is log 2."""
    sft = recipe_for(model_cache_dir, MemoryReporter(), validation=None, method=method, n_epochs=2, learning_rate=0.01)
    sft.setup()
    sft.train()
    folder = tmp_path / "sft"
    folder.mkdir()
    sft.export(folder)
    trained = sft.trainable_state()

    models = ModelStore(model_cache_dir, None)
    context = MethodContext(record=TINY, models=models, placement=resolve_placement("auto", "auto"))
    reporter = MemoryReporter()
    dpo = TrainingRecipe(
        METHODS[method],
        hyperparameters_class(method, "dpo").model_validate({"n_epochs": 1, "learning_rate": 0.01}).for_model(TINY),
        model=training_base_model(METHODS[method], context),
        tokenizer=models.tokenizer(TINY),
        context=context,
        train=[preference_line(f"Pick a color ({i})", "blue", "red") for i in range(4)],
        valid=None,
        reporter=reporter,
        limits=recipe_limits(Settings()),
        objective="dpo",
        start_from=folder,
    )
    dpo.setup()
    start = dpo.trainable_state()
    assert start.keys() == trained.keys()
    for name, tensor in trained.items():
        torch.testing.assert_close(start[name], tensor, msg=name)
    dpo.train()
    assert reporter.of_type("metrics")[0]["train_loss"] == pytest.approx(0.693147, abs=1e-5)
    assert any("reference log-probabilities computed once" in message for _, message, _ in reporter.events)


@pytest.mark.slow  # three training runs
def test_a_resumed_dpo_run_keeps_its_reference_and_ends_where_an_uninterrupted_run_does(model_cache_dir: Path) -> None:
    """Full fine-tuning's reference is precomputed: a run resumed from a checkpoint reads it from the checkpoint
    (recomputing it from the trained weights would change every loss after) and ends with the same weights."""
    train = [preference_line(f"Pick a color ({i})", "blue", "red") for i in range(8)]
    hp = {"n_epochs": 2, "batch_size": 1, "checkpoint_every": 4, "learning_rate": 1e-3, "validation_split": 0.25}

    def recipe(reporter: MemoryReporter, checkpoints: MemoryCheckpoints) -> TrainingRecipe:
        made = dpo_recipe(model_cache_dir, reporter, "full", train, **hp)
        made.checkpoints = checkpoints
        return made

    whole_reporter = MemoryReporter()
    whole = recipe(whole_reporter, MemoryCheckpoints())
    whole.setup()
    whole.train()
    first = recipe(MemoryReporter(), MemoryCheckpoints(interrupt_after=3))  # at step 8 of 12, mid-epoch
    first.setup()
    with pytest.raises(Interrupted):
        first.train()
    saved_step, state = first.checkpoints.saved[-1]  # type: ignore[union-attr]
    assert saved_step == 8 and state["objective"]["reference"]["train"].shape == (6, 2)
    resumed_reporter = MemoryReporter()
    resumed = recipe(resumed_reporter, MemoryCheckpoints())
    resumed.setup(resume=state)
    resumed.train()

    assert not any("computed once" in message for _, message, _ in resumed_reporter.events)
    steps = [d["step"] for d in resumed_reporter.of_type("metrics")]
    assert steps == list(range(saved_step + 1, whole.position.step + 1))
    expected = {d["step"]: d for d in whole_reporter.of_type("metrics")}
    for got in resumed_reporter.of_type("metrics"):
        for name in ("train_loss", "train_rewards_margins", "train_rewards_accuracies"):
            assert got[name] == pytest.approx(expected[got["step"]][name], abs=1e-5), name
    assert resumed_reporter.of_type("eval")[-1]["valid_loss"] == pytest.approx(
        whole_reporter.of_type("eval")[-1]["valid_loss"], abs=1e-5
    )
    final, reference = resumed.trainable_state(), whole.trainable_state()
    for name, tensor in reference.items():
        torch.testing.assert_close(final[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
