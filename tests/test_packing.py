"""Padding-free packing: several examples to a row, each attending only to itself, and the output layer only where
a loss is taken. Speed may not change the math: per example, the losses and gradients of a packed batch are those
of each example alone (the architecture's own forward pass), on every architecture the recipe packs."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM

from app.ml.formatting import IGNORE_INDEX, EncodedExample
from app.ml.training import loss, memory
from app.ml.training.data import collate, collate_packed, packed_micro_batches
from app.ml.training.loss import PACKING_ARCHITECTURES, accumulate_gradients, evaluation_stats
from tests.model_factories import ARCHITECTURES, build_tiny_model

PAD = 0
LENGTHS = [37, 5, 12, 60, 9, 23, 2, 41, 17, 30]


def make_examples(lengths: list[int], vocab: int, seed: int = 0) -> list[EncodedExample]:
    """Random ids; loss on the second half of each example (a completion after its prompt), and on every token
    of the odd ones (plain text, whose first label no position predicts)."""
    rng = random.Random(seed)
    examples = []
    for i, n in enumerate(lengths):
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        labels = list(ids) if i % 2 else [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]
        examples.append(EncodedExample(ids, labels))
    return examples


def lora_model(arch: str, folder: Path) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    # Non-zero B: every LoRA matrix gets a gradient worth comparing. eval(): no dropout, deterministic passes.
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    return get_peft_model(model, config).eval()  # type: ignore[no-any-return]


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def test_rows_hold_every_example_once_within_the_budget_padding_only_at_row_ends() -> None:
    rng = random.Random(7)
    examples = make_examples([rng.randint(1, 300) for _ in range(64)], vocab=100)
    for budget in (256, 1024, 4096):
        groups = packed_micro_batches(examples, budget)
        packed = [e for rows in groups for row in rows for e in row]
        assert sorted(map(id, packed)) == sorted(map(id, examples))
        longest = max(len(e.input_ids) for e in examples)
        for rows in groups:
            batch = collate_packed(rows, PAD)
            assert batch["input_ids"].numel() <= budget or len(rows) == 1
            for row in rows:
                assert sum(len(e.input_ids) for e in row) <= max(longest, min(512, budget))
        # Far less padding than a padded batch of the same examples in the same budget.
        padded = sum(collate_packed(rows, PAD)["input_ids"].numel() for rows in groups)
        real = sum(len(e.input_ids) for e in examples)
        assert padded < 1.1 * real, (budget, padded, real)


def test_a_packed_row_restarts_positions_and_ignores_each_example_s_first_label() -> None:
    a, b = EncodedExample([5, 6, 7], [5, 6, 7]), EncodedExample([8, 9], [IGNORE_INDEX, 9])
    batch = collate_packed([[a, b], [b]], PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [8, 9, PAD, PAD, PAD]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    # What position t predicts is labels[t + 1]: never the next example's first token, never padding.
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 9, -100, -100, -100]]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packing")
    return {arch: build_tiny_model(arch, root / arch, chat_template=False) for arch in ARCHITECTURES}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_packed_losses_and_gradients_are_each_example_s_own(arch: str, folders: dict[str, Path]) -> None:
    assert arch in PACKING_ARCHITECTURES
    model = lora_model(arch, folders[arch])
    examples = make_examples(LENGTHS, vocab=model.config.vocab_size)
    rows = [row for rows in packed_micro_batches(examples, 10**6, row_tokens=96) for row in rows]
    assert max(len(row) for row in rows) >= 3  # really packed

    # Per example: the token losses of the packed rows, summed by example, are those of the example alone.
    batch = collate_packed(rows, PAD)
    hidden = model.get_decoder()(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
    ).last_hidden_state
    token_loss = F.cross_entropy(
        model.get_output_embeddings()(hidden[:, :-1]).transpose(1, 2),
        batch["labels"][:, 1:],
        reduction="none",
    )
    at = 0
    for row_index, row in enumerate(rows):
        at = 0
        for example in row:
            n = len(example.input_ids)
            packed = token_loss[row_index, at : at + n - 1].sum()
            alone = model(input_ids=torch.tensor([example.input_ids]), use_cache=False).logits
            labels = torch.tensor(example.labels[1:])
            reference = F.cross_entropy(alone[0, :-1], labels, reduction="sum", ignore_index=IGNORE_INDEX)
            torch.testing.assert_close(packed, reference, atol=1e-5, rtol=1e-4)
            at += n

    # The step: packed (several micro-batches) = padded = HF's own loss over the padded batch, and the gradients.
    packed_stats = accumulate_gradients(model, examples, pad_token_id=PAD, max_batch_tokens=128, pack=True)
    packed_grads = gradients(model)
    padded_stats = accumulate_gradients(model, examples, pad_token_id=PAD, max_batch_tokens=10**6)
    padded_grads = gradients(model)
    hf = model(**collate(examples, PAD))
    hf.loss.backward()
    hf_grads = gradients(model)
    assert sorted(packed_grads) == sorted(hf_grads) and packed_grads
    torch.testing.assert_close(packed_grads, padded_grads, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(packed_grads, hf_grads, atol=1e-6, rtol=1e-4)
    assert packed_stats.loss == pytest.approx(padded_stats.loss, rel=1e-5)
    assert packed_stats.loss == pytest.approx(hf.loss.item(), rel=1e-5)
    assert (packed_stats.tokens, packed_stats.correct) == (padded_stats.tokens, padded_stats.correct)

    with torch.no_grad():
        evaluated = evaluation_stats(model, examples, pad_token_id=PAD, max_batch_tokens=128, pack=True)
    assert evaluated.loss == pytest.approx(padded_stats.loss, rel=1e-5)


def test_the_output_layer_in_small_chunks_gives_the_same_loss_and_gradients(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks are checkpointed (their logits recomputed in the backward pass): the gradients may not change."""
    model = lora_model("llama", folders["llama"])
    examples = make_examples(LENGTHS, vocab=model.config.vocab_size)
    whole = accumulate_gradients(model, examples, pad_token_id=PAD, max_batch_tokens=10**6, pack=True)
    whole_grads = gradients(model)
    monkeypatch.setattr(loss, "LOSS_CHUNK_POSITIONS", 7)  # ~14 chunks
    chunked = accumulate_gradients(model, examples, pad_token_id=PAD, max_batch_tokens=10**6, pack=True)
    chunked_grads = gradients(model)
    torch.testing.assert_close(chunked_grads, whole_grads, atol=1e-6, rtol=1e-4)
    assert chunked.loss == pytest.approx(whole.loss, rel=1e-6) and chunked.correct == whole.correct


def budget_case(folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> tuple[nn.Module, Any, int]:
    """A LoRA model on a CPU placement, its estimated activation bytes a token, and plenty of free memory."""
    from app.ml.device import resolve_placement

    model = lora_model("llama", folders["llama"])
    placement = resolve_placement("cpu", "float32")
    monkeypatch.setattr(memory.psutil, "virtual_memory", lambda: SimpleNamespace(available=10**12))
    return model, placement, memory.activation_bytes_per_token(model, placement)


def test_the_micro_batch_budget_shrinks_to_what_free_memory_holds(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, placement, per_token = budget_case(folders, monkeypatch)
    # Plenty: the configured limit, but on a CPU no more than the tokens that keep its cores busy.
    assert memory.micro_batch_budget(model, placement, 2048, packed=True) == memory.CPU_MICRO_BATCH_TOKENS == 1024
    assert memory.micro_batch_budget(model, placement, 512, packed=True) == 512
    assert memory.micro_batch_budget(model, placement, 2048) == 2048  # padded micro-batches: the whole limit
    monkeypatch.setattr(memory.psutil, "virtual_memory", lambda: SimpleNamespace(available=600 * per_token))
    assert memory.micro_batch_budget(model, placement, 2048) == 300  # half of what is free
    monkeypatch.setattr(memory.psutil, "virtual_memory", lambda: SimpleNamespace(available=0))
    assert memory.micro_batch_budget(model, placement, 2048) == memory.MIN_BATCH_TOKENS


def test_the_budget_counts_what_the_adapted_modules_keep(folders: dict[str, Path]) -> None:
    """LoRA on every linear layer keeps more activations a token than LoRA on q/v: each adapted module's input
    and rank-r projection, on top of the base model's share; the budget's estimate grows with them."""
    from app.ml.device import resolve_placement

    placement = resolve_placement("cpu", "float32")
    config = AutoModelForCausalLM.from_pretrained(folders["llama"], dtype=torch.float32).config
    hidden, inner, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers

    def adapted(targets: list[str] | str, r: int, dropout: float = 0.0) -> nn.Module:
        base = AutoModelForCausalLM.from_pretrained(folders["llama"], dtype=torch.float32)
        config = LoraConfig(r=r, target_modules=targets, lora_dropout=dropout, task_type="CAUSAL_LM")
        return get_peft_model(base, config)

    q_v, every = adapted(["q_proj", "v_proj"], 8), adapted("all-linear", 8)
    assert memory.adapter_activation_units(q_v) == layers * (2 * hidden + 2 * 8)
    assert memory.adapter_activation_units(every) == layers * (6 * hidden + inner + 7 * 8)
    base_share = memory.ACTIVATION_BYTES_PER_LAYER_UNIT * layers * hidden * 4
    assert memory.activation_bytes_per_token(every, placement) == base_share + 4 * layers * (6 * hidden + inner + 56)
    assert memory.activation_bytes_per_token(every, placement) > memory.activation_bytes_per_token(q_v, placement)
    # Under dropout each adapted module also keeps its input's dropped copy's mask (a byte an element).
    dropped = adapted("all-linear", 8, dropout=0.05)
    kept = 6 * (hidden + hidden // 4) + inner + inner // 4 + 7 * 8
    assert memory.adapter_activation_units(dropped) == layers * kept


def test_a_cpu_micro_batch_keeps_its_activations_within_the_byte_cap(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, placement, per_token = budget_case(folders, monkeypatch)
    monkeypatch.setattr(memory, "CPU_MICRO_BATCH_BYTES", 700 * per_token)
    assert memory.micro_batch_budget(model, placement, 2048, packed=True) == 700  # the bytes, not 1024 tokens
    assert memory.micro_batch_budget(model, placement, 2048) == 2048  # padded micro-batches: the whole limit
    monkeypatch.setattr(memory, "CPU_MICRO_BATCH_BYTES", 10 * per_token)
    assert memory.micro_batch_budget(model, placement, 2048, packed=True) == memory.MIN_BATCH_TOKENS
