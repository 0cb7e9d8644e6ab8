"""Contract tests over the method registry (as PEFT's test matrix is): every method that runs on a CPU, on the tiny
model, through the recipe alone (no HTTP, no database) and through the serving engine.

For each method: exactly the intended tensors change, the loss falls on a learnable task, early stopping stops and
publishes the best step, the artifact round-trips through the ecosystem's loader, and the engine's greedy output
equals transformers + peft (the reference) with every method's adapter loaded in one engine.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from app.core.errors import InvalidInput
from app.core.queue import cuda_queue
from app.core.settings import Settings
from app.core.storage import ObjectStorage
from app.jobs.planning import checked_hyperparameters
from app.jobs.state import JobCancelled
from app.main import create_app
from app.ml import adapter_format
from app.ml.device import cuda_training_available, resolve_placement
from app.ml.formatting import IGNORE_INDEX, EncodedExample, encode_prompt
from app.ml.hyperparameters import TrainingHyperparameters
from app.ml.methods import METHODS
from app.ml.methods.base import BaseWeights, MethodContext, PeftMethod
from app.ml.methods.delta import CONFIG, TENSORS, DeltaMethod, decoder_blocks, untie_output
from app.ml.models import BUILTINS, ModelRecord, ModelStore
from app.ml.models import importing as model_import
from app.ml.serving import (
    MAX_DELTA_MODELS,
    AdapterRef,
    AdapterUnavailable,
    GenerationEngine,
    GenerationRequest,
)
from app.ml.training import TrainingRecipe
from app.ml.training import base_models as base_model_cache
from app.ml.training.data import collate
from app.ml.training.loss import accumulate_gradients, evaluation_stats
from tests.conftest import Tenant, chat_lines, jsonl, serving_limits, upload
from tests.model_factories import ARCHITECTURES, build_tiny_model
from tests.test_jobs import queued_messages
from tests.test_recipe import TINY, MemoryReporter, recipe_for
from worker.runner import run_training_job

CPU_METHODS = [name for name, method in METHODS.items() if not method.needs_cuda]

# A peak learning rate at which each method learns the tiny task in a few steps, and options that make its
# contract visible (a schedule that unfreezes within the run, a decay and a block left frozen).
LEARNING_RATES = {
    "lora": 0.05,
    "ia3": 0.3,
    "prompt_tuning": 0.3,
    "p_tuning": 0.01,
    "prefix_tuning": 0.3,
    "head": 0.03,
    "layerwise": 0.03,
    "discriminative": 0.03,
    "full": 0.03,
}
OPTIONS: dict[str, dict[str, Any]] = {
    "lora": {"target_modules": "all-linear"},
    "layerwise": {"unfreeze_every": 2, "unfreeze_unit": "steps"},
    "discriminative": {"lr_decay": 0.5, "n_layers": 1},
}


def test_every_registered_method_is_covered_here() -> None:
    """A new method joins this matrix (with a learning rate) or these tests fail."""
    assert sorted(LEARNING_RATES) == sorted(CPU_METHODS)
    assert sorted(METHODS) == sorted([*CPU_METHODS, "qlora"])


def method_recipe(cache: Path, method: str, reporter: MemoryReporter, **overrides: Any) -> TrainingRecipe:
    options = {"learning_rate": LEARNING_RATES[method], **OPTIONS.get(method, {}), **overrides}
    return recipe_for(cache, reporter, method=method, **options)


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def expected_changes(method: str, model: torch.nn.Module) -> set[str]:
    """The tensors each method must train on the tiny model (2 blocks, output layer tied to the embeddings)."""
    names = {name for name, _ in model.named_parameters()}
    if isinstance(METHODS[method], PeftMethod):  # the adapter's own weights, none of the base model's
        return {name for name, param in model.named_parameters() if param.requires_grad}
    if method == "head":
        return {"lm_head.weight"}
    if method == "discriminative":  # n_layers=1: the top block only
        return {"lm_head.weight"} | {name for name in names if name.startswith("model.layers.1.")}
    if method == "layerwise":  # both blocks are unfrozen by step 5 of 8
        return {"lm_head.weight"} | {name for name in names if name.startswith("model.layers.")}
    assert method == "full"
    return names


@pytest.mark.parametrize("method", CPU_METHODS)
def test_each_method_trains_exactly_its_tensors_and_learns(model_cache_dir: Path, method: str) -> None:
    reporter = MemoryReporter()
    recipe = method_recipe(model_cache_dir, method, reporter, n_epochs=4)
    recipe.setup()
    before = parameters(recipe.model)
    metrics = recipe.train()

    losses = [data["train_loss"] for data in reporter.of_type("metrics")]
    evaluations = [data["valid_loss"] for data in reporter.of_type("eval")]
    assert len(losses) == 8 and losses[-1] < 0.75 * losses[0], losses
    assert evaluations[-1] < 0.75 * losses[0] and metrics["valid_loss"] == evaluations[-1]

    after = parameters(recipe.model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == expected_changes(method, recipe.model)
    [setup] = [data for data in reporter.of_type("log") if "trainable_parameters" in data]
    assert setup["trainable_parameters"] == sum(p.numel() for p in recipe.trainable_params) > 0
    assert setup["trainable_share"] == round(setup["trainable_parameters"] / setup["total_parameters"], 6)
    # The base model's parameters, and a PEFT adapter's own; an untied output layer is not counted twice.
    added = setup["trainable_parameters"] if isinstance(METHODS[method], PeftMethod) else 0
    assert setup["total_parameters"] == TINY.n_parameters + added
    if method in ("head", "layerwise", "discriminative"):
        # The tiny model ties its output layer to the input embeddings: these untie it, and the embeddings stay.
        pristine = ModelStore(model_cache_dir, None).load(TINY)
        assert recipe.model.lm_head.weight is not recipe.model.model.embed_tokens.weight
        assert torch.equal(recipe.model.model.embed_tokens.weight, pristine.model.embed_tokens.weight)
    if method == "full":  # tied stays tied: one matrix trains for both
        assert recipe.model.lm_head.weight is recipe.model.model.embed_tokens.weight
    # The worker's cached base model is as loaded: what the job trained had tensors of its own, while what it
    # did not train shared the cached weights' memory rather than holding a second copy of them.
    [cached] = base_model_cache._base_models.values()
    loaded = ModelStore(model_cache_dir, None).load(TINY).state_dict()
    assert all(torch.equal(tensor, loaded[name]) for name, tensor in cached.state_dict().items())
    cached_memory = {p.data_ptr() for p in cached.parameters()}
    shared = {name for name, p in recipe.model.named_parameters() if p.data_ptr() in cached_memory}
    assert not shared & recipe.trained_names
    assert shared if method != "full" else not shared


def test_layerwise_unfreezes_one_block_at_a_time_on_schedule(model_cache_dir: Path) -> None:
    reporter = MemoryReporter(cancel_after_step=4)
    recipe = method_recipe(model_cache_dir, "layerwise", reporter, n_epochs=4)
    recipe.setup()
    before = parameters(recipe.model)
    # Every block is in the optimizer from the start, so it picks each one up when it gets a gradient.
    in_optimizer = {id(p) for group in recipe.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in in_optimizer for block in decoder_blocks(recipe.model) for p in block.parameters())
    with pytest.raises(JobCancelled):
        recipe.train()  # 4 of 8 steps: output layer from step 1, the top block from step 3, the lower one not yet
    changed = {name for name, value in parameters(recipe.model).items() if not torch.equal(value, before[name])}
    assert changed == {"lm_head.weight"} | {name for name in before if name.startswith("model.layers.1.")}
    unfrozen = [(data["step"], message) for kind, message, data in reporter.events if "unfroze" in message]
    assert [step for step, _ in unfrozen] == [3]
    assert unfrozen[0][1].startswith("step 3: unfroze block 1")


def test_layerwise_counts_epochs_by_default(model_cache_dir: Path) -> None:
    reporter = MemoryReporter()
    recipe = recipe_for(model_cache_dir, reporter, method="layerwise", n_epochs=3, learning_rate=0.01)
    recipe.setup()
    recipe.train()
    # 2 steps an epoch: block 1 from epoch 2 (step 3), block 0 from epoch 3 (step 5).
    assert [data["step"] for kind, message, data in reporter.events if "unfroze" in message] == [3, 5]


def test_discriminative_learning_rates_fall_by_lr_decay_per_block(model_cache_dir: Path) -> None:
    reporter = MemoryReporter()
    recipe = recipe_for(model_cache_dir, reporter, method="discriminative", learning_rate=0.01, lr_decay=0.25)
    recipe.setup()
    groups = recipe.optimizer.param_groups
    blocks = decoder_blocks(recipe.model)
    assert [g["initial_lr"] for g in groups] == pytest.approx([0.01, 0.0025, 0.000625])
    assert groups[0]["params"] == [recipe.model.lm_head.weight]
    assert groups[1]["params"] == list(blocks[1].parameters()) and groups[2]["params"] == list(blocks[0].parameters())
    recipe.train()
    # The schedule scales every group alike: the ratio holds at every step.
    lrs = [g["lr"] for g in recipe.optimizer.param_groups]
    assert lrs[1] == pytest.approx(lrs[0] * 0.25) and lrs[2] == pytest.approx(lrs[0] * 0.25**2)


@pytest.mark.parametrize("method", CPU_METHODS)
def test_early_stopping_publishes_the_best_step_for_every_method(model_cache_dir: Path, method: str) -> None:
    """Trained on "plum", validated on "kiwi": once the model is sure of "plum" the validation loss rises."""
    reporter = MemoryReporter()
    recipe = method_recipe(model_cache_dir, method, reporter, validation="kiwi", n_epochs=30, early_stopping_patience=2)
    recipe.setup()
    recipe.train()
    evaluations = {data["step"]: data["valid_loss"] for data in reporter.of_type("eval")}
    [summary] = reporter.of_type("early_stopping")
    assert summary["stopped_early"] is True and max(evaluations) < recipe.total_steps
    assert summary["best_valid_loss"] == min(evaluations.values()) == evaluations[summary["best_step"]]
    # The model is the best evaluation's, not the last one's.
    assert recipe.valid_data is not None
    assert recipe.evaluate(recipe.valid_data)["valid_loss"] == pytest.approx(summary["best_valid_loss"], abs=1e-5)


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_virtual_tokens_do_not_shift_labels_against_logits(model_cache_dir: Path, method: str) -> None:
    """The recipe's loss over a padded batch equals PEFT's own loss (which pads the labels for the virtual tokens)
    example by example."""
    recipe = method_recipe(model_cache_dir, method, MemoryReporter())
    recipe.setup()
    recipe.model.eval()
    examples = recipe.train_data.examples[:1]
    longer = type(examples[0])(examples[0].input_ids + [5, 6, 7], examples[0].labels + [IGNORE_INDEX] * 3)
    for example in (examples[0], longer):
        stats = evaluation_stats(recipe.model, [example], pad_token_id=recipe.pad_token_id, max_batch_tokens=4096)
        batch = collate([example], recipe.pad_token_id)
        with torch.no_grad():
            reference = recipe.model(**batch).loss  # PEFT prepends IGNORE_INDEX labels for the virtual tokens
        assert stats.loss == pytest.approx(float(reference), rel=1e-5)


# --- artifacts and serving ---------------------------------------------------------------------------------
@dataclass
class Trained:
    method: str
    folder: Path  # the exported artifact
    model: torch.nn.Module  # the model as trained, in eval mode
    ref: AdapterRef


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, model_cache_dir: Path) -> dict[str, Trained]:
    """Every CPU method trained once on "plum" and published into one object store (and LoRA once more, with DoRA
    and rsLoRA, as "lora+dora")."""
    root = tmp_path_factory.mktemp("methods")
    storage = ObjectStorage.from_settings(Settings(data_dir=root / "store", model_cache_dir=model_cache_dir))
    out = {}
    variants = [(method, method, {}) for method in CPU_METHODS]
    variants.append(("lora+dora", "lora", {"use_dora": True, "use_rslora": True}))
    for name, method, options in variants:
        reporter = MemoryReporter()
        recipe = method_recipe(model_cache_dir, method, reporter, n_epochs=3, validation=None, **options)
        recipe.setup()
        recipe.train()
        folder = root / name / "artifact"
        folder.mkdir(parents=True)
        recipe.export(folder)
        archive = root / name / "artifact.tar.gz"
        _, sha256 = adapter_format.pack(folder, archive, {"method": method})
        key = f"adapters/t/{name}.tar.gz"
        storage.put_path(key, archive)
        recipe.model.eval()
        out[name] = Trained(method, folder, recipe.model, AdapterRef(f"adapter-{name}", key, sha256, method))
    return out


def reference_model(method: str, folder: Path, cache: Path) -> torch.nn.Module:
    """The artifact loaded the ecosystem's way: peft's PeftModel.from_pretrained, or load_state_dict for deltas."""
    from peft import PeftModel
    from safetensors.torch import load_file

    base = ModelStore(cache, None).load(TINY)
    if METHODS[method].artifact_format == "peft":
        return PeftModel.from_pretrained(base, str(folder)).eval()
    config = json.loads((folder / CONFIG).read_text())
    if config["untied_output"]:
        untie_output(base)
    result = base.load_state_dict(load_file(str(folder / TENSORS)), strict=False)
    assert not result.unexpected_keys
    return base


PROMPT = "The secret word is"


@pytest.mark.parametrize("method", CPU_METHODS)
def test_the_artifact_round_trips(trained: dict[str, Trained], model_cache_dir: Path, method: str) -> None:
    item = trained[method]
    files = {path.name for path in item.folder.iterdir()}
    if METHODS[method].artifact_format == "peft":
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files
        config = json.loads((item.folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == TINY.id
    else:
        config = json.loads((item.folder / CONFIG).read_text())
        assert files == {CONFIG, TENSORS, adapter_format.MANIFEST}
        assert config["base_model"] == TINY.id and config["method"] == method
        assert config["base_model_weights_sha256"] == ModelStore(model_cache_dir, None).weights_sha256(TINY)
        assert sorted(config["tensors"]) == sorted(expected_changes(method, item.model))  # only what trained
    reference = reference_model(method, item.folder, model_cache_dir)
    ids = torch.tensor([[1, 504, 3072, 1837, 314, 30, 12]])
    with torch.no_grad():
        assert torch.allclose(reference(input_ids=ids).logits, item.model(input_ids=ids).logits, atol=1e-5)


def test_one_engine_serves_every_method_equal_to_the_reference(
    trained: dict[str, Trained], model_cache_dir: Path, tmp_path: Path
) -> None:
    """All ten adapters (nine methods, and LoRA with DoRA and rsLoRA) in one engine: first every request alone,
    then all of them (twice each, and the base model between them) submitted at once so that they decode in one
    mixed batch. Every greedy output is token-identical to the artifact loaded alone by transformers + peft,
    decoded step by step."""
    storage = ObjectStorage.from_settings(Settings(data_dir=next(iter(trained.values())).folder.parents[1] / "store"))
    models = ModelStore(model_cache_dir, None)
    engine = GenerationEngine(
        models=models,
        placement=resolve_placement("cpu", "float32"),
        storage=storage,
        cache_dir=tmp_path / "adapters",
        limits=serving_limits(max_adapters=16),
    )
    tokenizer = models.tokenizer(TINY)
    input_ids = encode_prompt(tokenizer, PROMPT)

    def request(ref: AdapterRef | None) -> GenerationRequest:
        return GenerationRequest(model=TINY, input_ids=input_ids, adapter=ref, max_tokens=6, temperature=0)

    def offline(model: torch.nn.Module) -> list[int]:
        """Greedy decoding by the model's own forward pass over the whole sequence at each step (no KV cache, no
        `generate`): what the trained model predicts, whatever a cache implementation does."""
        ids = list(input_ids)
        with torch.no_grad():
            for _ in range(6):
                logits = model(input_ids=torch.tensor([ids])).logits
                ids.append(int(logits[0, -1].argmax()))
                if ids[-1] == tokenizer.eos_token_id:
                    break
        return ids[len(input_ids) :]

    try:
        base = offline(models.load(TINY))
        assert engine.generate(request(None)).token_ids == base
        alone = {method: engine.generate(request(item.ref)).token_ids for method, item in trained.items()}
        for name, item in trained.items():
            assert alone[name] == offline(reference_model(item.method, item.folder, model_cache_dir)), name
        # All at once: one mixed batch (the delta adapters in their own lanes), base rows between adapter rows.
        steps = engine.steps
        refs = [None, *[item.ref for item in trained.values()], None, *[item.ref for item in trained.values()]]
        batch = [engine.submit(request(ref)) for ref in refs]
        outputs = [generation.result(timeout=120).token_ids for generation in batch]
        for ref, ids in zip(refs, outputs, strict=True):
            assert ids == (base if ref is None else alone[ref.id.removeprefix("adapter-")]), ref
        assert engine.steps - steps < 6 * len(refs) / 2  # decoded together, not one request after another
        dora = json.loads((trained["lora+dora"].folder / "adapter_config.json").read_text())
        assert dora["use_dora"] is True and dora["use_rslora"] is True
        # Memory: the weight deltas held stay within their bound, and each shares the base model's other tensors.
        [loaded] = engine.residency.bases.values()
        deltas = [s for s in loaded.adapters.values() if s.own_model is not None]
        assert 0 < sum(s.n_bytes for s in deltas) <= MAX_DELTA_MODELS * loaded.model_bytes
        for servable in deltas:
            shared = {id(p) for p in loaded.plain.parameters()} & {id(p) for p in servable.own_model.parameters()}
            if servable.ref.method != "full":
                assert shared, servable.ref.method
        assert offline(loaded.plain) == base  # the base model itself never changed
        learned = [method for method, ids in alone.items() if tokenizer.decode(ids).startswith(" plum")]
        assert len(learned) >= 6, alone  # most of them learned the word in 3 epochs; all differ from the base
        assert [method for method, ids in alone.items() if ids == base] == []
    finally:
        engine.close()


def test_a_delta_for_other_base_weights_is_refused(
    trained: dict[str, Trained], model_cache_dir: Path, tmp_path: Path
) -> None:
    item = trained["head"]
    folder = tmp_path / "tampered"
    shutil.copytree(item.folder, folder)
    config = json.loads((folder / CONFIG).read_text())
    config["base_model_weights_sha256"] = "0" * 64
    (folder / CONFIG).write_text(json.dumps(config))
    storage = ObjectStorage.from_settings(Settings(data_dir=tmp_path / "store"))
    sha = adapter_format.pack(folder, tmp_path / "a.tar.gz", {"method": "head"})[1]
    storage.put_path("adapters/t/x.tar.gz", tmp_path / "a.tar.gz")
    engine = GenerationEngine(
        models=ModelStore(model_cache_dir, None),
        placement=resolve_placement("cpu", "float32"),
        storage=storage,
        cache_dir=tmp_path / "adapters",
        limits=serving_limits(max_adapters=4),
    )
    try:
        request = GenerationRequest(
            model=TINY, input_ids=[1, 2, 3], adapter=AdapterRef("adapter-x", "adapters/t/x.tar.gz", sha, "head")
        )
        with pytest.raises(AdapterUnavailable, match="trained on other weights of tiny-random-llama"):
            engine.generate(request)
    finally:
        engine.close()


# --- hyperparameters -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "values", "field", "says"),
    [
        ("lora", {"use_dora": "yes"}, "use_dora", "boolean"),
        ("prompt_tuning", {"num_virtual_tokens": 0}, "num_virtual_tokens", "greater than or equal to 1"),
        ("prompt_tuning", {"prompt_init": "text"}, "prompt_init_text", "needs a prompt_init_text"),
        ("prompt_tuning", {"prompt_init_text": "hello"}, "prompt_init_text", "only used with prompt_init='text'"),
        ("p_tuning", {"max_seq_length": 2040}, "max_seq_length", "at most 2028 for text"),
        ("prefix_tuning", {"encoder_hidden_size": 64}, "encoder_hidden_size", "only used with prefix_projection"),
        ("ia3", {"target_modules": ["q_proj", "nope"]}, "target_modules", "nope is not a linear layer"),
        ("ia3", {"target_modules": ["q_proj"], "feedforward_modules": ["down_proj"]}, "feedforward_modules", "not in"),
        ("layerwise", {"unfreeze_unit": "hours"}, "unfreeze_unit", "'epochs' or 'steps'"),
        ("discriminative", {"n_layers": 3}, "n_layers", "tiny-random-llama has 2 blocks"),
        ("discriminative", {"lr_decay": 0}, "lr_decay", "greater than 0"),
        ("head", {"lora_r": 8}, "lora_r", "unknown hyperparameter for method 'head'"),
    ],
)
def test_each_methods_hyperparameters_are_checked(method: str, values: dict[str, Any], field: str, says: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        checked_hyperparameters(method, values, TINY)
    assert caught.value.param == f"hyperparameters.{field}"
    assert says in str(caught.value)


def test_method_defaults_fill_in_for_the_model() -> None:
    ia3 = checked_hyperparameters("ia3", {}, TINY).model_dump(mode="json")
    assert ia3["target_modules"] == ["k_proj", "v_proj", "down_proj"] and ia3["feedforward_modules"] == ["down_proj"]
    prompt = checked_hyperparameters("prompt_tuning", {"num_virtual_tokens": 48}, TINY).model_dump(mode="json")
    assert prompt["max_seq_length"] == 512  # the default fits: 512 + 48 <= 2048
    smollm2 = BUILTINS["smollm2-135m-instruct"]
    assert (
        checked_hyperparameters("discriminative", {"n_layers": 30}, smollm2).model_dump(mode="json")["n_layers"] == 30
    )
    lora = checked_hyperparameters("lora", {"use_dora": True, "use_rslora": True}, TINY).model_dump(mode="json")
    assert lora["use_dora"] and lora["use_rslora"] and lora["target_modules"] == ["q_proj", "v_proj"]


# --- through the service -----------------------------------------------------------------------------------------
# The fast tier takes LoRA through the service; the other methods there are trained, exported and served in the
# library tests above, and through the service in the whole suite.
@pytest.mark.parametrize("method", [m if m == "lora" else pytest.param(m, marks=pytest.mark.slow) for m in CPU_METHODS])
def test_every_method_end_to_end_through_the_service(
    client: TestClient, tenant: Tenant, settings: Settings, method: str
) -> None:
    """POST /jobs -> the worker trains, evaluates and stops early -> the job reports it -> the adapter downloads in
    its method's format -> /generate serves it."""
    train, valid = ([json.dumps({"prompt": PROMPT, "completion": f" {word}"})] * 8 for word in ("plum", "kiwi"))
    train_id = upload(client, tenant, jsonl(train)).json()["id"]
    valid_id = upload(client, tenant, jsonl(valid), "valid.jsonl").json()["id"]
    hyperparameters = {"n_epochs": 30, "learning_rate": LEARNING_RATES[method], "early_stopping_patience": 2}
    body = {
        "base_model": TINY.id,
        "method": method,
        "training_file": train_id,
        "validation_file": valid_id,
        "hyperparameters": {**hyperparameters, **OPTIONS.get(method, {})},
    }
    plan = client.post("/jobs", headers=tenant.headers, json={**body, "dry_run": True}).json()
    created = client.post("/jobs", headers=tenant.headers, json=body)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    assert created.json()["reserved_bytes"] == plan["estimated_stored_bytes"] > 0
    adapter_id = run_training_job(settings, job_id)
    job = client.get(f"/jobs/{job_id}", headers=tenant.headers).json()
    assert job["status"] == "succeeded" and job["adapter_id"] == adapter_id is not None
    assert job["method"] == method and 0 < job["metrics"]["trainable_share"] <= 1
    # What POST /jobs reserved of the quota was sized on what the method trains, counted as the recipe counts it.
    assert plan["trainable_parameters"] == job["metrics"]["trainable_parameters"]
    assert job["metrics"]["stopped_early"] is True and job["metrics"]["best_step"] < job["progress"]["total_steps"]

    adapter = client.get(f"/adapters/{adapter_id}", headers=tenant.headers).json()
    assert adapter["method"] == method and adapter["format"] == METHODS[method].artifact_format
    keep = job["hyperparameters"]["keep_checkpoints"]
    assert (keep + 1) * adapter["size_bytes"] <= job["reserved_bytes"]
    download = client.get(f"/adapters/{adapter_id}/download", headers=tenant.headers)
    assert download.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(download.content), mode="r:gz") as tar:
        names = set(tar.getnames())
        manifest = json.loads(tar.extractfile(adapter_format.MANIFEST).read())  # type: ignore[union-attr]
    artifact = (
        {"adapter_config.json", "adapter_model.safetensors"} if adapter["format"] == "peft" else {CONFIG, TENSORS}
    )
    assert artifact <= names
    assert manifest["method"] == method and manifest["metrics"]["best_step"] == job["metrics"]["best_step"]

    r = client.post(
        "/generate",
        headers=tenant.headers,
        json={"adapter_id": adapter_id, "prompt": PROMPT, "max_tokens": 4, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    assert r.json()["adapter_id"] == adapter_id and r.json()["usage"]["completion_tokens"] >= 1
    if method in ("prefix_tuning", "prompt_tuning", "p_tuning"):
        # Virtual tokens take positions too: the prompt and max_tokens get the model's context less those.
        prompt_tokens = r.json()["usage"]["prompt_tokens"]
        request = {"adapter_id": adapter_id, "prompt": PROMPT, "max_tokens": TINY.max_seq_length - prompt_tokens}
        r = client.post("/generate", headers=tenant.headers, json=request)
        assert r.status_code == 422 and r.json()["error"]["param"] == "max_tokens"
        assert "less the adapter's 20 virtual tokens" in r.json()["error"]["message"]


def test_qlora_is_refused_where_no_cuda_gpu_trains(client: TestClient, tenant: Tenant) -> None:
    if cuda_training_available("auto"):
        pytest.skip("this machine can train qlora")
    file_id = upload(client, tenant, jsonl(chat_lines(4))).json()["id"]
    r = client.post(
        "/jobs", headers=tenant.headers, json={"base_model": TINY.id, "method": "qlora", "training_file": file_id}
    )
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["param"] == "method" and error["code"] == "method_unavailable"
    assert "needs a CUDA GPU" in error["message"]


def test_a_qlora_job_waits_on_its_own_queue_for_a_cuda_worker(settings: Settings, tenant: Tenant) -> None:
    """With TUNEFORGE_CUDA_WORKERS=true (an API without a GPU, GPU workers behind it), qlora is accepted and goes to
    <queue>-cuda, which only workers that train on CUDA take; other jobs stay on the usual queue."""
    with TestClient(create_app(settings.model_copy(update={"cuda_workers": True}))) as client:
        file_id = upload(client, tenant, jsonl(chat_lines(4))).json()["id"]
        jobs = {}
        for method in ("qlora", "lora"):
            body = {"base_model": TINY.id, "method": method, "training_file": file_id}
            r = client.post("/jobs", headers=tenant.headers, json=body)
            assert r.status_code == 201, r.text
            jobs[method] = r.json()["id"]
    on_cuda = [repr({"job_id": jobs["qlora"]})]
    assert [m["kwargsrepr"] for m in queued_messages(settings, cuda_queue(settings.queue_name))] == on_cuda
    assert [m["kwargsrepr"] for m in queued_messages(settings)] == [repr({"job_id": jobs["lora"]})]


def test_prompt_init_from_text_names_no_server_path(tmp_path: Path, model_cache_dir: Path) -> None:
    recipe = method_recipe(
        model_cache_dir, "prompt_tuning", MemoryReporter(), prompt_init="text", prompt_init_text="plum"
    )
    recipe.setup()
    folder = tmp_path / "artifact"
    folder.mkdir()
    recipe.export(folder)
    config = (folder / "adapter_config.json").read_text()
    assert json.loads(config)["tokenizer_name_or_path"] == TINY.id
    assert str(model_cache_dir) not in config and str(tmp_path) not in config
    # The soft prompt starts as the text's embeddings, repeated to num_virtual_tokens.
    plum = encode_prompt(recipe.tokenizer, "plum")
    embeddings = recipe.model.get_input_embeddings().weight[plum]
    prompt = recipe.model.prompt_encoder["default"].embedding.weight
    assert torch.equal(prompt[: len(plum)], embeddings)


# --- every method on every architecture family ----------------------------------------------------------------
@pytest.fixture(scope="module")
def architectures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, ModelRecord]]:
    """A tiny random model folder of each family, with the record registration would make of it."""
    root = tmp_path_factory.mktemp("archs")
    out = {}
    for arch in ARCHITECTURES:
        folder = build_tiny_model(arch, root / arch, chat_template=False)
        facts = model_import.inspect(folder, max_seq_length=None)
        record = ModelRecord(
            id=f"tiny-{arch}",
            description="",
            source="path",
            architecture=facts.architecture,
            n_parameters=facts.n_parameters,
            max_seq_length=facts.max_seq_length,
            chat_template=False,
            linear_modules=facts.linear_modules,
            default_target_modules=facts.default_target_modules,
            revision="r",
            tokenizer_sha256="t",
            n_layers=facts.n_layers,
        )
        out[arch] = (folder, record)
    return out


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", CPU_METHODS)
def test_every_method_prepares_trains_and_exports_on_every_architecture(
    architectures: dict[str, tuple[Path, ModelRecord]], tmp_path: Path, arch: str, method: str
) -> None:
    """One optimizer step: exactly what the method trains (at its first step) gets a gradient and changes, the
    loss is finite, and the artifact is written; the serving engine then serves it, in a batch with the base
    model, token-identical to the artifact loaded with PEFT (or load_state_dict for a weight delta)."""
    from transformers import AutoModelForCausalLM

    folder, record = architectures[arch]
    spec = METHODS[method]
    hp = spec.hyperparameters.model_validate(
        {"num_virtual_tokens": 4} if "num_virtual_tokens" in spec.hyperparameters.model_fields else {}
    ).for_model(record)
    context = MethodContext(
        record=record, models=ModelStore(tmp_path, None), placement=resolve_placement("cpu", "float32")
    )
    model = spec.prepare(AutoModelForCausalLM.from_pretrained(str(folder)), hp, context)
    groups = spec.param_groups(model, hp)
    spec.before_step(model, hp, step=0, epoch=1, steps_per_epoch=1)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and {id(p) for name, p in model.named_parameters() if name in trainable} <= {
        id(p) for group in groups for p in group["params"]
    }
    before = parameters(model)
    optimizer = torch.optim.AdamW(groups)
    examples = [EncodedExample(list(range(5, 17)), [IGNORE_INDEX] * 6 + list(range(11, 17)))] * 2
    stats = accumulate_gradients(
        model, examples, pad_token_id=0, max_batch_tokens=4096, extra_positions=hp.reserved_positions()
    )
    assert math.isfinite(stats.loss) and stats.tokens == 12
    optimizer.step()
    changed = {name for name, value in parameters(model).items() if not torch.equal(value, before[name])}
    assert changed == trainable
    if method in ("head", "layerwise", "discriminative"):
        assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
        assert not model.get_input_embeddings().weight.requires_grad
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    spec.export(model, artifact, BaseWeights(record=record, weights_sha256="0" * 64))
    assert any(path.suffix == ".safetensors" for path in artifact.iterdir())
    # Served by the engine (in one batch with a base-model request), as the artifact loaded the ecosystem's way.
    storage = ObjectStorage.from_settings(Settings(data_dir=tmp_path / "store"))
    archive = tmp_path / "artifact.tar.gz"
    _, sha256 = adapter_format.pack(artifact, archive, {"method": method})
    storage.put_path("adapters/t/a.tar.gz", archive)
    engine = GenerationEngine(
        models=FolderModels(folder, tmp_path / "models"),
        placement=resolve_placement("cpu", "float32"),
        storage=storage,
        cache_dir=tmp_path / "cache",
        limits=serving_limits(),
    )
    prompt = [5, 6, 7, 8, 9]
    try:
        adapter, base = (
            engine.submit(GenerationRequest(record, prompt, adapter=ref, max_tokens=4, temperature=0, ignore_eos=True))
            for ref in (AdapterRef("adapter-x", "adapters/t/a.tar.gz", sha256, method), None)
        )
        assert adapter.result(timeout=60).token_ids == greedy(loaded_the_ecosystems_way(folder, artifact), prompt, 4)
        assert base.result(timeout=60).token_ids == greedy(AutoModelForCausalLM.from_pretrained(str(folder)), prompt, 4)
    finally:
        engine.close()


class FolderModels(ModelStore):
    """A model store serving one tiny model from its folder (its delta artifacts name no real weights)."""

    def __init__(self, folder: Path, cache: Path) -> None:
        super().__init__(cache, None)
        self.folder = folder

    def model_dir(self, record: ModelRecord) -> Path:
        return self.folder

    def tokenizer_dir(self, record: ModelRecord) -> Path:
        return self.folder

    def weights_sha256(self, record: ModelRecord) -> str:
        return "0" * 64


def loaded_the_ecosystems_way(folder: Path, artifact: Path) -> torch.nn.Module:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(folder))
    if (artifact / "adapter_config.json").exists():
        return PeftModel.from_pretrained(base, str(artifact)).eval()
    if json.loads((artifact / CONFIG).read_text())["untied_output"]:
        untie_output(base)
    base.load_state_dict(load_file(str(artifact / TENSORS)), strict=False)
    return base.eval()


def greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by full forward passes (no cache, no `generate`)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


# --- a method added without touching anything else ------------------------------------------------------------
class NormsHyperparameters(TrainingHyperparameters):
    learning_rate: float = 0.05


class NormsMethod(DeltaMethod):
    """A toy eleventh method, defined here as a new module would define it: only the RMSNorm scales train."""

    name = "toy_norms"
    hyperparameters = NormsHyperparameters
    unties_output = False

    def unfreeze(self, model: torch.nn.Module, hp: TrainingHyperparameters) -> None:
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.requires_grad_(True)


def test_a_new_method_trains_publishes_and_serves_with_no_change_elsewhere(
    model_cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A method is its module: registered, it trains through the recipe, exports, and the serving engine applies
    its artifact through the serving kind it names (a weight delta here), equal to the artifact loaded with
    load_state_dict. Nothing in the recipe, the engine or the adapter cache names a method."""
    method = NormsMethod()
    monkeypatch.setitem(METHODS, method.name, method)
    recipe = recipe_for(model_cache_dir, MemoryReporter(), method=method.name, n_epochs=3)
    recipe.setup()
    recipe.train()
    assert recipe.trained_names == {n for n, _ in recipe.model.named_parameters() if n.endswith("norm.weight")}
    folder = tmp_path / "artifact"
    folder.mkdir()
    recipe.export(folder)
    archive = tmp_path / "artifact.tar.gz"
    _, sha256 = adapter_format.pack(folder, archive, {"method": method.name})
    storage = ObjectStorage.from_settings(Settings(data_dir=tmp_path / "store"))
    storage.put_path("adapters/t/norms.tar.gz", archive)
    models = ModelStore(model_cache_dir, None)
    reference = models.load(TINY)
    reference.load_state_dict(load_file(str(folder / TENSORS)), strict=False)
    prompt = encode_prompt(models.tokenizer(TINY), PROMPT)
    engine = GenerationEngine(
        models=models,
        placement=resolve_placement("cpu", "float32"),
        storage=storage,
        cache_dir=tmp_path / "cache",
        limits=serving_limits(),
    )
    try:
        ref = AdapterRef("adapter-norms", "adapters/t/norms.tar.gz", sha256, method.name)
        served = engine.generate(GenerationRequest(TINY, prompt, adapter=ref, max_tokens=6, temperature=0))
        assert served.token_ids == greedy(reference, prompt, 6)
        assert served.token_ids != greedy(models.load(TINY), prompt, 6)  # it learned something
    finally:
        engine.close()
