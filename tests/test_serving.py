"""The serving engine on its own: many adapters in one batch equal to PEFT alone, continuous batching, per-request
sampling, cancellation, backpressure, the adapter cache and the KV-cache budget. (Every method's trained adapter
in one mixed batch against the reference is in test_methods.py; the HTTP side is in test_inference_api.py.)"""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from app.core.settings import Settings
from app.core.storage import ObjectStorage
from app.ml import adapter_format
from app.ml.device import resolve_placement
from app.ml.models import BUILTINS, ModelStore
from app.ml.serving import (
    MAX_BASE_MODELS,
    AdapterRef,
    AdapterUnavailable,
    Delta,
    EngineOverloaded,
    GenerationEngine,
    GenerationRequest,
)
from app.ml.serving.adapters import AdapterStore
from tests.conftest import serving_limits
from tests.test_methods import greedy

TINY = BUILTINS["tiny-random-llama"]
PROMPTS = [[1, 504, 3072, 1837], [1, 30, 12, 900, 77, 5, 61], [1, 4000], [1, 7, 7, 7, 7, 7, 7, 7, 7, 200]]


@dataclass
class Made:
    ref: AdapterRef
    folder: Path


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ObjectStorage:
    return ObjectStorage.from_settings(Settings(data_dir=tmp_path_factory.mktemp("serving-store")))


def publish(storage: ObjectStorage, folder: Path, name: str, method: str) -> AdapterRef:
    archive = folder.parent / f"{name}.tar.gz"
    _, sha256 = adapter_format.pack(folder, archive, {"method": method})
    key = f"adapters/t/{name}.tar.gz"
    storage.put_path(key, archive)
    return AdapterRef(f"adapter-{name}", key, sha256, method)


def make_lora(root: Path, storage: ObjectStorage, cache: Path, name: str, seed: int, **config: Any) -> Made:
    """A LoRA adapter with random (non-zero) weights: it changes the output without training."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(
        ModelStore(cache, None).load(TINY), LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **config)
    )
    folder = root / name
    model.save_pretrained(str(folder))
    return Made(publish(storage, folder, name, "lora"), folder)


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory, store: ObjectStorage, model_cache_dir: Path) -> list[Made]:
    """Eight LoRA adapters of ranks 2 to 16 on different layers, one with DoRA and one with rsLoRA."""
    root = tmp_path_factory.mktemp("loras")
    configs: list[dict[str, Any]] = [
        {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]},
        {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
        {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        {"r": 16, "lora_alpha": 16, "target_modules": ["k_proj", "o_proj", "down_proj"]},
        {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "use_dora": True},
        {"r": 12, "lora_alpha": 24, "target_modules": "all-linear", "use_rslora": True},
        {"r": 4, "lora_alpha": 32, "target_modules": ["gate_proj", "up_proj"]},
        {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]},
    ]
    return [make_lora(root, store, model_cache_dir, f"lora{i}", seed=i, **c) for i, c in enumerate(configs)]


@pytest.fixture
def engine(
    store: ObjectStorage, model_cache_dir: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Any]:
    limits = getattr(request, "param", serving_limits())
    engine = GenerationEngine(
        models=ModelStore(model_cache_dir, None),
        placement=resolve_placement("cpu", "float32"),
        storage=store,
        cache_dir=tmp_path / "adapter-cache",
        limits=limits,
    )
    yield engine
    engine.close()


def request(prompt: list[int], ref: AdapterRef | None = None, **options: Any) -> GenerationRequest:
    options = {"max_tokens": 8, "temperature": 0, "ignore_eos": True, **options}
    return GenerationRequest(model=TINY, input_ids=prompt, adapter=ref, **options)


def test_eight_lora_adapters_in_one_batch_equal_peft_alone(
    engine: GenerationEngine, loras: list[Made], model_cache_dir: Path
) -> None:
    """Sixteen requests (eight adapters of different ranks and layers, with the base model between them, prompts
    of different lengths) submitted at once decode together, each token-identical to PEFT with its adapter alone."""
    from peft import PeftModel

    jobs = []
    for i in range(16):
        made = loras[i % 8] if i % 4 != 3 else None
        jobs.append((PROMPTS[i % len(PROMPTS)], made, 4 + i % 5))
    steps = engine.steps
    generations = [engine.submit(request(p, m.ref if m else None, max_tokens=n)) for p, m, n in jobs]
    outputs = [g.result(timeout=120).token_ids for g in generations]
    assert engine.steps - steps <= 2 * max(n for _, _, n in jobs)  # together: not one request after another
    for (prompt, made, n), ids in zip(jobs, outputs, strict=True):
        base = ModelStore(model_cache_dir, None).load(TINY)
        model = PeftModel.from_pretrained(base, str(made.folder)).eval() if made else base
        assert ids == greedy(model, prompt, n), made and made.ref.id
    assert len({tuple(ids) for ids in outputs}) > 8  # the adapters do change the text


def test_a_seeded_request_samples_the_same_text_in_any_batch(engine: GenerationEngine, loras: list[Made]) -> None:
    seeded = request(PROMPTS[0], loras[2].ref, temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=12)
    alone = engine.generate(seeded).token_ids
    others = [request(p, m.ref, temperature=1.0, max_tokens=20) for p, m in zip(PROMPTS * 2, loras, strict=False)]
    crowd = [engine.submit(r) for r in others[:3]]
    again = engine.submit(seeded)
    crowd += [engine.submit(r) for r in others[3:]]
    assert again.result(timeout=60).token_ids == alone
    assert all(g.result(timeout=60).finish_reason == "length" for g in crowd)
    other_seed = engine.generate(request(PROMPTS[0], loras[2].ref, temperature=0.9, seed=99, max_tokens=12))
    assert other_seed.token_ids != alone


def test_a_short_request_joins_a_busy_batch_at_the_next_step(engine: GenerationEngine, loras: list[Made]) -> None:
    engine.generate(request(PROMPTS[0], loras[1].ref, max_tokens=1))  # its adapter loaded: admission need not wait
    started = threading.Event()
    long = engine.submit(request(PROMPTS[1], loras[0].ref, max_tokens=400), on_delta=lambda _: started.set())
    assert started.wait(60)
    steps = engine.steps
    at_token: list[int] = []  # the engine's step count at each of the short request's tokens (its own thread)
    short = engine.submit(
        request(PROMPTS[0], loras[1].ref, max_tokens=2), on_delta=lambda _: at_token.append(engine.steps)
    )
    assert short.result(timeout=60).completion_tokens == 2
    # Admitted after the step under way: its first token comes from its prefill, its second from the next step.
    assert at_token[0] - steps <= 3
    assert at_token[-1] - at_token[0] <= 1
    assert not long.future.done()
    long.cancel()
    assert long.result(timeout=30).finish_reason == "cancelled"


def test_cancelling_frees_the_row_at_once(engine: GenerationEngine) -> None:
    deltas: list[Delta] = []
    generation = engine.submit(request(PROMPTS[0], max_tokens=4000, temperature=1.0), on_delta=deltas.append)
    deadline = time.monotonic() + 60
    while not deltas and time.monotonic() < deadline:
        time.sleep(0.01)
    generation.cancel()
    result = generation.result(timeout=10)
    assert result.finish_reason == "cancelled" and result.completion_tokens < 4000
    assert deltas[-1].finish_reason == "cancelled"
    time.sleep(0.2)
    assert engine.stats()["running"] == 0


@pytest.mark.parametrize("engine", [serving_limits(max_batch=1, max_waiting=2)], indirect=True)
def test_past_the_waiting_limit_requests_are_refused(engine: GenerationEngine) -> None:
    started = threading.Event()
    running = engine.submit(request(PROMPTS[0], max_tokens=4000), on_delta=lambda _: started.set())
    assert started.wait(60)
    waiting = [engine.submit(request(PROMPTS[1], max_tokens=2)) for _ in range(2)]
    with pytest.raises(EngineOverloaded):
        engine.submit(request(PROMPTS[2], max_tokens=2))
    running.cancel()
    assert [g.result(timeout=60).completion_tokens for g in waiting] == [2, 2]  # the waiting ones still run


def test_a_cold_adapter_loads_once_and_a_damaged_one_fails_only_its_requests(
    engine: GenerationEngine, loras: list[Made], store: ObjectStorage, tmp_path: Path
) -> None:
    broken = AdapterRef("adapter-broken", loras[3].ref.storage_key, "0" * 64, "lora")  # checksum mismatch
    missing = AdapterRef("adapter-missing", "adapters/t/nothing.tar.gz", "0" * 64, "lora")
    misses = engine.store.misses
    good = [engine.submit(request(PROMPTS[i % 4], loras[5].ref)) for i in range(6)]
    bad = [engine.submit(request(PROMPTS[0], broken)), engine.submit(request(PROMPTS[1], missing))]
    assert all(g.result(timeout=60).completion_tokens == 8 for g in good)
    with pytest.raises(AdapterUnavailable, match="damaged"):
        bad[0].result(timeout=60)
    with pytest.raises(AdapterUnavailable, match="missing"):
        bad[1].result(timeout=60)
    assert engine.store.misses - misses == 3  # six requests for one cold adapter: one download


def disk_tier(storage: ObjectStorage, cache_dir: Path, disk_bytes: int = 1 << 30) -> AdapterStore:
    """The disk tier of one serving process (its host memory is its own; `cache_dir` may be shared)."""
    return AdapterStore(
        storage=storage, cache_dir=cache_dir, dtype=torch.float32, host_bytes=1 << 30, disk_bytes=disk_bytes
    )


def load(tier: AdapterStore, ref: AdapterRef) -> Any:
    return tier.fetch(ref, weights_sha256="unused-by-lora").result(timeout=60)


def test_a_cached_adapter_that_cannot_be_read_is_fetched_again_once(
    loras: list[Made], store: ObjectStorage, tmp_path: Path
) -> None:
    """A replica finds the adapter's folder on the shared disk but cannot read it (a file gone or cut short): it
    drops that copy and fetches the archive once more, and the request is served. An archive that is itself
    unreadable fails its requests after that one fetch, never in a loop."""
    ref = loras[0].ref
    first = disk_tier(store, tmp_path / "cache")
    try:
        expected = load(first, ref).n_bytes
    finally:
        first.close()
    weights = next((tmp_path / "cache" / ref.id).rglob("adapter_model.safetensors"))
    whole = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:100])  # damaged on disk, its manifest and config intact

    damaged = tmp_path / "damaged"
    shutil.copytree(loras[0].folder, damaged)
    (damaged / "adapter_model.safetensors").write_bytes(b"not safetensors")
    unreadable = publish(store, damaged, "unreadable", "lora")
    replica = disk_tier(store, tmp_path / "cache")
    try:
        assert load(replica, ref).n_bytes == expected
        assert (replica.hits, replica.misses) == (1, 1)  # found on the disk, unreadable: downloaded again
        assert weights.stat().st_size == whole  # a whole copy in its place
        with pytest.raises(AdapterUnavailable, match="could not be read"):
            load(replica, unreadable)
        with pytest.raises(AdapterUnavailable, match="could not be read"):
            load(replica, unreadable)  # on the disk now: fetched once more, then refused
        assert (replica.hits, replica.misses) == (2, 3)
    finally:
        replica.close()


def test_a_replica_never_reads_an_adapter_folder_another_is_deleting(
    loras: list[Made], store: ObjectStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two replicas share the disk cache. While one deletes an adapter's folder (its disk budget is full), the other
    asks for that adapter: it must never find the folder half-deleted, and it serves the adapter."""
    import app.ml.serving.adapters as adapters

    cache = tmp_path / "cache"
    trimming = disk_tier(store, cache, disk_bytes=1)  # keeps only the adapter it loaded last
    other = disk_tier(store, cache)
    live = cache / loras[0].ref.id
    seen: dict[str, Any] = {}
    real_rmtree = shutil.rmtree

    def slow_rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
        name = Path(path).name  # the live folder, or a tombstone of it (not an archive being unpacked)
        if "during" not in seen and (
            name == live.name or name.startswith(f".{live.name}.") and name.endswith(".deleted")
        ):
            next(Path(path).rglob("adapter_model.safetensors")).unlink()  # the deletion is under way
            seen["during"] = live.exists()
            seen["loaded"] = load(other, loras[0].ref)  # the other replica asks for it now
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(adapters.shutil, "rmtree", slow_rmtree)
    try:
        load(trimming, loras[0].ref)
        load(trimming, loras[1].ref)  # over the budget: loras[0]'s folder goes
        assert seen["during"] is False, "the live folder was visible while it was being deleted"
        assert seen["loaded"].n_bytes > 0 and (other.hits, other.misses) == (0, 1)
        assert live.is_dir() and not [p for p in cache.iterdir() if p.name.endswith(".deleted")]
    finally:
        trimming.close()
        other.close()


def test_cold_adapter_time_to_first_token(engine: GenerationEngine, loras: list[Made]) -> None:
    """Loading a cold rank-8 adapter from local storage adds little to the first token (the benchmark measures
    it: bench/serving.py); here, a sanity bound that catches a pathological path."""
    engine.generate(request(PROMPTS[0]))  # the base model is loaded
    start = time.perf_counter()
    engine.generate(request(PROMPTS[0], loras[2].ref, max_tokens=1))
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("engine", [serving_limits(max_adapters=3, adapter_bytes=1 << 30)], indirect=True)
def test_the_device_cache_keeps_its_bound_and_never_evicts_running_adapters(
    engine: GenerationEngine, loras: list[Made]
) -> None:
    started = threading.Event()
    pinned = engine.submit(request(PROMPTS[0], loras[0].ref, max_tokens=4000), on_delta=lambda _: started.set())
    assert started.wait(60)
    for made in loras[1:]:
        engine.generate(request(PROMPTS[1], made.ref, max_tokens=1))
    [base] = engine.residency.bases.values()
    assert len(base.adapters) == 3
    assert loras[0].ref.id in base.adapters  # the running request's adapter stayed, though least recently used
    pinned.cancel()
    pinned.result(timeout=30)


def test_a_byte_budget_bounds_the_device_cache(store: ObjectStorage, model_cache_dir: Path, tmp_path: Path) -> None:
    engine = GenerationEngine(
        models=ModelStore(model_cache_dir, None),
        placement=resolve_placement("cpu", "float32"),
        storage=store,
        cache_dir=tmp_path / "cache",
        limits=serving_limits(adapter_bytes=20_000),
    )
    try:
        made = [
            make_lora(tmp_path, store, model_cache_dir, f"small{i}", seed=i, r=8, target_modules=["q_proj"])
            for i in range(4)
        ]
        for m in made:
            engine.generate(request(PROMPTS[0], m.ref, max_tokens=1))
        [base] = engine.residency.bases.values()
        sizes = [s.n_bytes for s in base.adapters.values()]
        assert sizes == [8192, 8192]  # two of 8 KiB fit in 20 kB: the least recently used went
    finally:
        engine.close()


@pytest.mark.parametrize("engine", [serving_limits(kv_cache_bytes=64 * 1024)], indirect=True)
def test_a_kv_cache_budget_makes_requests_wait_not_fail(engine: GenerationEngine, loras: list[Made]) -> None:
    """With room for about two rows of this length, eight requests all finish, never more than fit at once."""
    generations = [engine.submit(request(PROMPTS[i % 4], loras[i].ref, max_tokens=30)) for i in range(8)]
    peak = 0
    while not all(g.future.done() for g in generations):
        peak = max(peak, engine.stats()["running"])
        time.sleep(0.002)
    assert all(g.result().completion_tokens == 30 for g in generations)
    assert 1 <= peak <= 3


def test_streamed_deltas_make_the_text_and_never_show_part_of_a_stop_string(
    engine: GenerationEngine, model_cache_dir: Path
) -> None:
    tokenizer = ModelStore(model_cache_dir, None).tokenizer(TINY)
    full = engine.generate(request(PROMPTS[0], max_tokens=24, temperature=0, ignore_eos=False))
    deltas: list[Delta] = []
    streamed = engine.submit(request(PROMPTS[0], max_tokens=24, ignore_eos=False), on_delta=deltas.append).result(30)
    assert "".join(d.text for d in deltas) == streamed.text == full.text
    assert [d.finish_reason for d in deltas][-1] == full.finish_reason
    assert sum(len(d.token_ids) for d in deltas) == full.completion_tokens
    text = full.text
    if len(text) >= 6:
        stop = text[3:6]
        deltas = []
        cut = engine.submit(request(PROMPTS[0], max_tokens=24, stop=[stop]), on_delta=deltas.append).result(30)
        assert cut.text == text[: text.find(stop)] and cut.finish_reason == "stop"
        assert "".join(d.text for d in deltas) == cut.text
        assert all(stop[:2] not in d.text for d in deltas)
    assert tokenizer is not None


def test_logprobs_are_the_models_distribution(engine: GenerationEngine, model_cache_dir: Path) -> None:
    result = engine.generate(request(PROMPTS[0], max_tokens=3, logprobs=3))
    model = ModelStore(model_cache_dir, None).load(TINY)
    ids = list(PROMPTS[0])
    assert result.logprobs is not None and len(result.logprobs) == 3
    with torch.no_grad():
        for item in result.logprobs:
            expected = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
            assert item.token_id == int(expected.argmax())
            assert item.logprob == pytest.approx(float(expected[item.token_id]), abs=1e-4)
            assert [t for _, t, _ in item.top] == expected.topk(3).indices.tolist()
            ids.append(item.token_id)


def test_requests_for_more_base_models_than_are_kept_loaded_all_finish(engine: GenerationEngine) -> None:
    """Three base models (the tiny model under three revisions) while two are kept loaded, all requested at once:
    every request finishes (the third model waits for one of the others to drain) and never more than two are
    in memory."""
    records = [dataclasses.replace(TINY, revision=f"revision-{i}") for i in range(3)]
    generations = [
        engine.submit(GenerationRequest(model=r, input_ids=PROMPTS[i], max_tokens=12, temperature=0, ignore_eos=True))
        for r in records
        for i in range(2)
    ]
    loaded = 0
    while not all(g.future.done() for g in generations):
        loaded = max(loaded, len(engine.residency.bases))
        time.sleep(0.005)
    assert [g.result().completion_tokens for g in generations] == [12] * 6
    assert loaded <= MAX_BASE_MODELS
