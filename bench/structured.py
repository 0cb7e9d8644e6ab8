"""Structured outputs in the batching engine: what a grammar-constrained row costs, and what it costs the free rows
that share its batch, measured in the same run on one engine.

    .venv/bin/python bench/structured.py [--model smollm2-135m-instruct] [--threads 2] [--rows 8] [--tokens 64]
    .venv/bin/python bench/structured.py --quick      # the tiny random model, a few seconds: a smoke run

The load: `--rows` free chat requests (greedy past the end-of-sequence token, `--tokens` new tokens each), with
one more row sampled at temperature 1 beside them: (a) none, (b) an unconstrained one, (c) one constrained to a
JSON schema (a list of people, at least 100 of them, so that it cannot finish before `--tokens` and shares the
whole run). (b) and (c) differ only in the constraint. The loads are alternated, best of two each (a shared
machine's speed drifts). Printed:
- the schema's compile time (the first, after the tokenizer's one-time preparation for llguidance; then a cached
  one) — done by the API before a request reaches the engine;
- the free rows' tokens/s in each load, and (c) / (b) (target >= 0.95: the free rows do not slow down because the
  row beside them is constrained) and (c) / (a);
- the constrained row's overhead per token: the host's mask computation (llguidance) and the whole per-row logits
  processing (mask to the device, applied), p50 and p90, against the step time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import add_options, bench_settings, environment, parse_options, serving_limits, torch_placement

import app.ml.serving.logits as logits_module
import app.ml.serving.output as output_module
from app.core.storage import ObjectStorage
from app.ml.formatting import encode_chat_prompt
from app.ml.models import BUILTINS, ModelStore
from app.ml.serving import GenerationEngine, GenerationRequest
from app.ml.serving.grammar import GRAMMARS, Grammars

PEOPLE = {
    "type": "object",
    "properties": {
        "people": {
            "type": "array",
            "minItems": 100,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 40},
                    "age": {"type": "integer", "minimum": 0, "maximum": 130},
                    "email": {"type": "string", "format": "email"},
                    "roles": {"type": "array", "items": {"enum": ["admin", "editor", "viewer"]}, "maxItems": 3},
                    "active": {"type": "boolean"},
                },
                "required": ["name", "age", "email", "roles", "active"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["people"],
    "additionalProperties": False,
}
QUESTIONS = [
    "Write a short poem about the sea.",
    "What is the capital of France, and why is it famous?",
    "Explain photosynthesis to a ten-year-old.",
    "List three tips for staying focused while studying.",
    "Why is the sky blue?",
    "Suggest a name for a friendly robot.",
    "How do airplanes stay in the air?",
    "Tell me a fun fact about octopuses.",
]


class Timed:
    """Wraps a module's function, keeping how long each call took (seconds)."""

    def __init__(self, module: Any, name: str) -> None:
        self.inner = getattr(module, name)
        self.seconds: list[float] = []
        setattr(module, name, self)

    def __call__(self, *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return self.inner(*args)
        finally:
            self.seconds.append(time.perf_counter() - started)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(
    engine: GenerationEngine, free: list[GenerationRequest], constrained: GenerationRequest | None
) -> tuple[float, float]:
    """The free rows' tokens/s (their tokens over the time until the last of them ends) and seconds per step."""
    steps = engine.steps
    started = time.perf_counter()
    extra = [engine.submit(constrained)] if constrained is not None else []
    generations = [engine.submit(request) for request in free]
    tokens = sum(g.result().completion_tokens for g in generations)
    seconds = time.perf_counter() - started
    for generation in extra:  # it shared the whole run (and, constrained, kept to its grammar)
        result = generation.result()
        assert result.finish_reason == "length", result
        assert constrained.grammar is None or result.text.startswith('{"people":['), result
    return tokens / seconds, seconds / max(1, engine.steps - steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser, "--model", "--threads")
    parser.add_argument("--rows", type=int, default=8, help="free rows in the batch")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per row")
    parser.add_argument("--quick", action="store_true", help="tiny-random-llama, 4 rows of 24 tokens: a smoke run")
    add_options(parser, "--models-dir", "--device", "--dtype")
    args = parse_options(parser)
    if args.quick:
        args.model, args.rows, args.tokens = "tiny-random-llama", 4, 24
    with tempfile.TemporaryDirectory() as tmp:
        settings = bench_settings(Path(tmp), args)
        placement = torch_placement(args)
        record = BUILTINS[args.model]
        models = ModelStore(settings.models_dir, None)
        tokenizer = models.tokenizer(record)
        env = environment(placement)
        print(f"model {args.model}, torch {env['torch']}, {env['threads']} threads, {env['placement']}")

        cache = Grammars()  # a cache of its own: the first compile prepares the tokenizer too
        started = time.perf_counter()
        cache.json(tokenizer, tokenizer_key="bench", schema={"type": "object"}, name="warm-up")
        prepare = time.perf_counter() - started
        started = time.perf_counter()
        cache.json(tokenizer, tokenizer_key="bench", schema=PEOPLE, name="people")
        compiled = time.perf_counter() - started
        started = time.perf_counter()
        grammar = cache.json(tokenizer, tokenizer_key="bench", schema=PEOPLE, name="people")
        cached = time.perf_counter() - started
        print(
            f"schema compile: {compiled * 1000:.1f} ms (after the tokenizer's one-time preparation, "
            f"{prepare * 1000:.0f} ms); cached {cached * 1e6:.0f} us"
        )
        GRAMMARS.json(tokenizer, tokenizer_key="bench", schema=PEOPLE, name="people")  # as the API would

        prompts = [
            encode_chat_prompt(tokenizer, [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
            for i in range(args.rows)
        ]
        free = [
            GenerationRequest(record, prompt, max_tokens=args.tokens, temperature=0, ignore_eos=True)
            for prompt in prompts
        ]
        ask = [{"role": "user", "content": "List the people of our team as JSON."}]
        constrained = GenerationRequest(
            record, encode_chat_prompt(tokenizer, ask), max_tokens=args.tokens, temperature=1.0, grammar=grammar
        )
        sampled = GenerationRequest(
            record, encode_chat_prompt(tokenizer, ask), max_tokens=args.tokens, temperature=1.0, ignore_eos=True
        )
        lengths = sorted(map(len, prompts))
        print(f"{args.rows} free rows (prompts of {lengths[0]}-{lengths[-1]} tokens), {args.tokens} new tokens each")

        engine = GenerationEngine(
            models=models,
            placement=placement,
            storage=ObjectStorage.from_settings(settings),
            cache_dir=Path(tmp) / "cache",
            limits=serving_limits(max_batch=max(32, args.rows + 1)),
        )
        run(engine, free[:2], constrained)  # warm-up: loads the model, builds the lexer's first states
        masks, processing = Timed(logits_module, "_masks"), Timed(output_module, "process")
        loads: dict[str, list[tuple[float, float]]] = {"alone": [], "sampled": [], "constrained": []}
        for _ in range(2):
            loads["alone"].append(run(engine, free, None))
            loads["sampled"].append(run(engine, free, sampled))
            masks.seconds.clear()
            processing.seconds.clear()
            loads["constrained"].append(run(engine, free, constrained))
        engine.close()
        (alone, alone_step), (beside, beside_step), (shared, shared_step) = (max(v) for v in loads.values())
        print()
        print(f"(a) free rows alone:                    {alone:8.1f} tok/s   {alone_step * 1000:7.2f} ms a step")
        print(f"(b) free rows beside a sampled row:     {beside:8.1f} tok/s   {beside_step * 1000:7.2f} ms a step")
        print(f"(c) free rows beside a constrained row: {shared:8.1f} tok/s   {shared_step * 1000:7.2f} ms a step")
        print(
            f"free rows' throughput (c) / (b): {shared / beside:5.3f}   (target >= 0.95); "
            f"(c) / (a): {shared / alone:5.3f}"
        )
        mask, whole = masks.seconds, processing.seconds
        print(
            f"constrained row, per token: mask (host) p50 {pct(mask, 0.5) * 1e6:.0f} us p90 {pct(mask, 0.9) * 1e6:.0f} "
            f"us; whole logits processing p50 {pct(whole, 0.5) * 1e6:.0f} us p90 {pct(whole, 0.9) * 1e6:.0f} us "
            f"({statistics.median(whole) / shared_step:.1%} of a step)"
        )


if __name__ == "__main__":
    main()
