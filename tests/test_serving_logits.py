"""The serving engine's per-row logit changes, rows with different ones in one batch: OpenAI's presence and frequency
penalties and `logit_bias` equal to a plain step-by-step reference, and grammar-constrained rows (structured
outputs) beside free rows that decode exactly as alone. (Over HTTP: test_openai_inference_options.py and
test_structured_outputs.py.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from app.core.settings import Settings
from app.core.storage import ObjectStorage
from app.ml.device import resolve_placement
from app.ml.models import BUILTINS, ModelStore
from app.ml.serving import GenerationEngine, GenerationRequest, OwnerOverloaded
from app.ml.serving.grammar import GRAMMARS, Grammar
from tests.conftest import serving_limits

TINY = BUILTINS["tiny-random-llama"]
PROMPTS = [[1, 504, 3072, 1837], [1, 30, 12, 900, 77, 5, 61], [1, 4000], [1, 7, 7, 7, 7, 7, 7, 7, 7, 200]]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "pets", "member"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, model_cache_dir: Path) -> Iterator[GenerationEngine]:
    root = tmp_path_factory.mktemp("serving-logits")
    engine = GenerationEngine(
        models=ModelStore(model_cache_dir, None),
        placement=resolve_placement("cpu", "float32"),
        storage=ObjectStorage.from_settings(Settings(data_dir=root)),
        cache_dir=root / "adapter-cache",
        limits=serving_limits(),
    )
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def model(model_cache_dir: Path) -> Any:
    return ModelStore(model_cache_dir, None).load(TINY).eval()


def grammar(model_cache_dir: Path, schema: dict[str, Any] | None) -> Grammar:
    store = ModelStore(model_cache_dir, None)
    return GRAMMARS.json(store.tokenizer(TINY), tokenizer_key=(TINY.id, TINY.revision), schema=schema, name="test")


def request(prompt: list[int], **options: Any) -> GenerationRequest:
    options = {"max_tokens": 16, "temperature": 0, "ignore_eos": True, **options}
    return GenerationRequest(model=TINY, input_ids=prompt, **options)


@torch.inference_mode()
def reference(
    model: Any, prompt: list[int], n: int, presence: float, frequency: float, bias: dict[int, float]
) -> list[int]:
    """Greedy decoding with OpenAI's definitions, one token at a time: logit - frequency * count - presence *
    (count > 0) + bias, the counts over the generated tokens only."""
    ids, out = list(prompt), []
    counts = torch.zeros(model.config.vocab_size)
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        logits = logits - frequency * counts - presence * (counts > 0).float()
        for token, value in bias.items():
            logits[token] += value
        token = int(logits.argmax())
        out.append(token)
        counts[token] += 1
        ids.append(token)
    return out


def test_penalties_and_logit_bias_per_row_equal_openai_definitions(engine: GenerationEngine, model: Any) -> None:
    """Rows with different penalties and biases (and a plain row) in one batch: each equals the reference alone."""
    favoured = {500: 12.0, 600: 11.0, 700: 10.0}  # above the model's logits (about ±7): they repeat
    settings = [
        (0.0, 0.0, {}),
        (0.0, 0.0, favoured),
        (0.0, 1.5, favoured),
        (8.0, 0.0, favoured),
        (-1.0, 0.5, {**favoured, 800: -100.0}),
    ]
    prompt = PROMPTS[1]
    plain = engine.submit(request(PROMPTS[3], max_tokens=30))  # another prompt's row shares the batch too
    generations = [
        engine.submit(request(prompt, presence_penalty=presence, frequency_penalty=frequency, logit_bias=bias))
        for presence, frequency, bias in settings
    ]
    outputs = [g.result(timeout=120).token_ids for g in generations]
    for (presence, frequency, bias), ids in zip(settings, outputs, strict=True):
        assert ids == reference(model, prompt, 16, presence, frequency, bias), (presence, frequency, bias)
    assert plain.result(timeout=120).token_ids == reference(model, PROMPTS[3], 30, 0, 0, {})

    def favoured_in(ids: list[int]) -> int:
        return sum(token in favoured for token in ids)

    # The reference itself tells the settings apart: biased alone, only the favoured tokens come; a frequency
    # penalty lets others in after some repeats, a presence penalty after each favoured token came once or twice.
    assert favoured_in(outputs[1]) == 16 and favoured_in(outputs[3]) < favoured_in(outputs[2]) < 16
    assert set(favoured) <= set(outputs[3])
    assert 800 not in outputs[4]


def test_a_banned_token_never_comes(engine: GenerationEngine) -> None:
    plain = engine.generate(request(PROMPTS[0])).token_ids
    banned = engine.generate(request(PROMPTS[0], logit_bias={plain[0]: -100.0, plain[1]: -100.0}))
    assert plain[0] not in banned.token_ids and plain[1] not in banned.token_ids
    forced = engine.generate(request(PROMPTS[0], temperature=1.0, logit_bias={1234: 100.0}))
    assert forced.token_ids == [1234] * 16


def test_constrained_and_free_rows_share_a_batch(engine: GenerationEngine, model_cache_dir: Path) -> None:
    """Grammar rows sampled at temperature 1 beside free rows (greedy and seeded): every constrained answer is JSON
    that validates, every free row's text is what it is alone, and they decoded together."""
    person = grammar(model_cache_dir, PERSON)
    free = [request(p, max_tokens=24) for p in PROMPTS] + [request(PROMPTS[1], temperature=1.0, seed=7, max_tokens=24)]
    alone = [engine.generate(r).token_ids for r in free]
    streamed: list[str] = []
    steps = engine.steps
    constrained = [
        engine.submit(request(PROMPTS[i % 4], temperature=1.0, grammar=person, max_tokens=80, ignore_eos=False))
        for i in range(6)
    ]
    together = [engine.submit(r) for r in free]
    watched = engine.submit(
        request(PROMPTS[0], temperature=1.0, seed=3, grammar=person, max_tokens=80, ignore_eos=False),
        on_delta=lambda delta: streamed.append(delta.text),
    )
    assert [g.result(timeout=120).token_ids for g in together] == alone
    for generation in [*constrained, watched]:
        result = generation.result(timeout=120)
        assert result.finish_reason == "stop", result
        jsonschema.validate(json.loads(result.text), PERSON)
        assert list(json.loads(result.text)) == list(PERSON["properties"])  # in the schema's order
    assert "".join(streamed) == watched.result().text
    assert engine.steps - steps < 80 + 24  # together, not one after another


def test_a_grammar_that_cannot_finish_in_time_ends_with_length(engine: GenerationEngine, model_cache_dir: Path) -> None:
    long = {"type": "object", "properties": {"a": {"type": "string", "minLength": 200}}, "required": ["a"]}
    result = engine.generate(request(PROMPTS[0], grammar=grammar(model_cache_dir, long), max_tokens=12))
    assert result.finish_reason == "length" and result.completion_tokens == 12
    assert result.text.startswith('{"a":"')


def test_json_object_rows_give_objects(engine: GenerationEngine, model_cache_dir: Path) -> None:
    anything = grammar(model_cache_dir, None)
    results = [
        engine.generate(request(p, temperature=1.0, seed=s, grammar=anything, max_tokens=64, ignore_eos=False))
        for s, p in enumerate(PROMPTS * 2)
    ]
    finished = [r for r in results if r.finish_reason == "stop"]
    assert finished  # a random model wanders in strings: not every one finishes in 64 tokens
    assert all(isinstance(json.loads(r.text), dict) for r in finished)
    assert all(r.text.startswith("{") for r in results)


def test_choices_enter_the_engine_all_or_none(tmp_path: Path, model_cache_dir: Path) -> None:
    engine = GenerationEngine(
        models=ModelStore(model_cache_dir, None),
        placement=resolve_placement("cpu", "float32"),
        storage=ObjectStorage.from_settings(Settings(data_dir=tmp_path)),
        cache_dir=tmp_path / "adapter-cache",
        limits=serving_limits(max_per_owner=3),
    )
    try:
        busy = engine.submit(request(PROMPTS[0], max_tokens=4000, owner="t"))
        with pytest.raises(OwnerOverloaded):
            engine.submit_all([request(PROMPTS[1], owner="t") for _ in range(3)])
        assert engine.scheduler.owned("t") == 1  # none of the three got in
        choices = engine.submit_all([request(PROMPTS[1], owner="t", max_tokens=3) for _ in range(2)])
        assert [g.result(timeout=60).completion_tokens for g in choices] == [3, 3]
        busy.cancel()
        assert busy.result(timeout=60).finish_reason == "cancelled"
    finally:
        engine.close()
