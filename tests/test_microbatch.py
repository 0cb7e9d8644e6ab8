"""Micro-batching of a training step under the token budget: the split, the gradients, and a real job."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from peft import LoraConfig, get_peft_model
from torch import nn

from app.core.db import migrate
from app.core.settings import Settings
from app.ml.formatting import IGNORE_INDEX, EncodedExample
from app.ml.models import BUILTINS, ModelStore
from app.ml.training import base_models
from app.ml.training.data import collate, micro_batches
from app.ml.training.loss import accumulate_gradients
from tests.conftest import Tenant, embedded_settings
from tests.test_worker import events, start_job
from worker.runner import run_training_job

PAD = 2


def make_examples(lengths: list[int], seed: int = 0) -> list[EncodedExample]:
    """Random token ids; loss on the second half of each example, as on a completion after its prompt."""
    rng = random.Random(seed)
    examples = []
    for n in lengths:
        ids = [rng.randrange(3, 1000) for _ in range(n)]
        labels = [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]
        examples.append(EncodedExample(ids, labels))
    return examples


@pytest.mark.parametrize(("budget", "extra"), [(64, 0), (100, 0), (257, 0), (4096, 0), (257, 20), (4096, 100)])
def test_micro_batches_cover_every_example_once_within_the_budget(budget: int, extra: int) -> None:
    """`extra`: positions the method adds to every row (virtual tokens), which the budget counts too."""
    rng = random.Random(budget)
    examples = make_examples([rng.randint(1, 150) for _ in range(48)] + [300])  # 300: over the smaller budgets
    groups = micro_batches(examples, budget, extra)

    assert sorted(id(e) for group in groups for e in group) == sorted(id(e) for e in examples)
    for group in groups:
        width = max(len(e.input_ids) for e in group) + extra
        assert len(group) * width <= budget or (len(group) == 1 and width > budget), [len(e.input_ids) for e in group]
    # Not split more than needed: the next group's first example would not have fitted in the one before.
    for group, following in zip(groups, groups[1:], strict=False):
        assert (len(group) + 1) * (len(following[0].input_ids) + extra) > budget


def test_one_example_is_one_micro_batch_even_over_budget() -> None:
    [example] = make_examples([500])
    assert micro_batches([example], 64) == [[example]]


def _model(kind: str, model_cache_dir: Path) -> nn.Module:
    model = ModelStore(model_cache_dir, None).load(BUILTINS["tiny-random-llama"])
    if kind == "lora":
        # Non-zero B so that every LoRA matrix gets a gradient worth comparing.
        config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    model.eval()  # no dropout: passes are deterministic
    return model  # type: ignore[no-any-return]


def _gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_micro_batched_gradients_equal_one_batch_and_the_hf_loss(kind: str, model_cache_dir: Path) -> None:
    model = _model(kind, model_cache_dir)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    examples = make_examples([5, 40, 12, 33, 7, 25, 18, 3, 29, 21])

    whole = accumulate_gradients(model, examples, pad_token_id=PAD, max_batch_tokens=10**6)
    whole_grads = _gradients(model)
    assert len(micro_batches(examples, 64)) >= 4
    split = accumulate_gradients(model, examples, pad_token_id=PAD, max_batch_tokens=64)
    split_grads = _gradients(model)
    reference = model(**collate(examples, PAD))  # HF's own mean token loss over the padded batch
    reference.loss.backward()
    reference_grads = _gradients(model)

    assert sorted(whole_grads) == sorted(split_grads) == sorted(reference_grads) == sorted(trainable)
    assert any(bool(g.abs().sum() > 0) for g in whole_grads.values())
    torch.testing.assert_close(split_grads, whole_grads, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(whole_grads, reference_grads, atol=1e-6, rtol=1e-4)
    assert split.loss == pytest.approx(whole.loss, rel=1e-5)
    assert whole.loss == pytest.approx(reference.loss.item(), rel=1e-5)
    assert split.tokens == whole.tokens == int((collate(examples, PAD)["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert split.correct == whole.correct
    assert split.input_tokens == sum(len(e.input_ids) for e in examples)


BUDGET = 128


@pytest.fixture
def settings(tmp_path: Path, model_cache_dir: Path) -> Settings:
    """Embedded backend only (micro-batching does not touch the database), with a small token budget."""
    s = embedded_settings(tmp_path / "data", model_cache_dir, train_max_batch_tokens=BUDGET)
    migrate(s.db_url)
    return s


def test_a_job_keeps_every_forward_pass_within_the_token_budget(
    client: TestClient, tenant: Tenant, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    forward_tokens: list[int] = []
    original = base_models.cached_base_model

    def watched_base_model(*args: Any) -> nn.Module:
        model = original(*args)

        def record(_module: nn.Module, args: tuple[Any, ...]) -> None:
            forward_tokens.append(args[0].numel())  # input_ids, padded, of one forward pass

        model.get_input_embeddings().register_forward_pre_hook(record)  # type: ignore[operator]
        return model

    monkeypatch.setattr(base_models, "cached_base_model", watched_base_model)
    job_id = start_job(client, tenant, batch_size=8)  # 8 examples: one step of 8 per epoch
    assert run_training_job(settings, job_id) is not None

    job = client.get(f"/jobs/{job_id}", headers=tenant.headers).json()
    assert job["status"] == "succeeded"
    assert job["progress"] == {"step": 2, "total_steps": 2, "epoch": 2}
    assert [e["data"]["step"] for e in events(client, tenant, job_id) if e["type"] == "metrics"] == [1, 2]
    # Each step and each evaluation ran as several forward passes, none over the budget.
    assert len(forward_tokens) >= 4 * 3, forward_tokens
    assert max(forward_tokens) <= BUDGET, forward_tokens
