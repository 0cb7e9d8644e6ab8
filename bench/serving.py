"""Serving many adapters at once: the batching engine against the baselines, measured in the same run.

    .venv/bin/python bench/serving.py [--model smollm2-135m-instruct] [--threads 2] [--requests 16] [--tokens 64]

The load: `--requests` concurrent chat requests (prompts of 15-70 tokens), each for a different LoRA adapter
(ranks 8 to 16 on PEFT's default layers, weights random but non-zero), `--tokens` new tokens each (greedy, past
the end-of-sequence token, so every run generates the same amount). Measured for:
- engine, adapters: this engine, all requests submitted at once;
- (a) engine, base: the same requests on the base model alone, through the same engine;
- (b) peft mixed batch: one `generate(..., adapter_names=[...])` call of a PeftModel holding every adapter,
  prompts left-padded (PEFT's mixed-adapter batch inference);
- (c) one at a time: `set_adapter` then `generate` for each request in turn (the serving engine before it
  batched), latencies counted from when all requests arrived.
The engine's two loads are alternated, best of two each (a shared machine's speed drifts). Printed for each:
aggregate generated tokens/s, p50 and p99 latency, p50 and p99 time to first token, and the ratios of the
engine's throughput to each baseline's (targets: >= 0.8x (a), >= 3x (b), >= 5x (c)). Then the time
to first token of a rank-8 adapter not yet cached (fetched from local object storage, unpacked, read, put on the
device) against the same adapter cached (target: cold adds under 150 ms), and the peak memory of the process.
Adapters and their object store live in a temporary folder; the base model is the converted one of the
default data dir.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import (  # bench/, beside this
    add_options,
    bench_settings,
    environment,
    parse_options,
    serving_limits,
    torch_placement,
)
from process_memory import rss_peak_mib  # bench/, beside this

from app.core.storage import ObjectStorage
from app.ml import adapter_format
from app.ml.device import Placement
from app.ml.formatting import encode_chat_prompt
from app.ml.methods.base import BaseWeights, MethodContext
from app.ml.methods.lora import LoraHyperparameters, LoraMethod
from app.ml.models import BUILTINS, ModelRecord, ModelStore
from app.ml.serving import AdapterRef, GenerationEngine, GenerationRequest

QUESTIONS = [
    "Write a short poem about the sea.",
    "What is the capital of France, and why is it famous?",
    "Explain photosynthesis to a ten-year-old in a few sentences, with an example from a garden.",
    "List three tips for staying focused while studying.",
    "Translate 'good morning, how are you today?' into Spanish and German.",
    "Describe the water cycle, from evaporation over the ocean to rain falling on a mountain and the rivers "
    "carrying it back, in plain words.",
    "Give me a recipe idea for a quick vegetarian dinner.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What are the benefits of regular exercise for the heart, the lungs and the mind? Answer briefly.",
    "Suggest a name for a friendly robot.",
    "How do airplanes stay in the air?",
    "Write a haiku about autumn leaves.",
    "What should I pack for a weekend hiking trip in the mountains in early spring, when nights are cold?",
    "Explain what a prime number is.",
    "Tell me a fun fact about octopuses.",
]


@dataclass
class Run:
    name: str
    seconds: float
    tokens: int
    latencies: list[float]
    first_tokens: list[float]

    @property
    def throughput(self) -> float:
        return self.tokens / self.seconds

    def line(self) -> str:
        def pct(values: list[float], q: float) -> float:
            ordered = sorted(values)
            return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

        return (
            f"{self.name:<22} {self.throughput:8.1f} tok/s   latency p50 {pct(self.latencies, 0.5):6.2f} s "
            f"p99 {pct(self.latencies, 0.99):6.2f} s   first token p50 {pct(self.first_tokens, 0.5):6.2f} s "
            f"p99 {pct(self.first_tokens, 0.99):6.2f} s"
        )


def make_adapters(
    ranks: list[int], record: ModelRecord, models: ModelStore, storage: ObjectStorage, root: Path, placement: Placement
) -> list[tuple[AdapterRef, Path]]:
    made = []
    weights = BaseWeights(record=record, weights_sha256=models.weights_sha256(record))
    context = MethodContext(record=record, models=models, placement=placement)
    for i, rank in enumerate(ranks):
        torch.manual_seed(i)
        hp = LoraHyperparameters(lora_r=rank, lora_alpha=2 * rank).for_model(record)
        lora = LoraMethod().prepare(models.load(record, placement), hp, context)
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)  # a non-trivial adapter
        folder = root / f"adapter-{i}"
        folder.mkdir(parents=True)
        LoraMethod().export(lora, folder, weights)
        archive = root / f"adapter-{i}.tar.gz"
        _, sha = adapter_format.pack(folder, archive, {"adapter_id": f"adapter-bench{i}"})
        key = f"adapters/bench/adapter-{i}.tar.gz"
        storage.put_path(key, archive)
        made.append((AdapterRef(f"adapter-bench{i}", key, sha, "lora"), folder))
    return made


def run_engine(
    name: str, engine: GenerationEngine, record: ModelRecord, prompts: list[list[int]], refs: list[Any], n: int
) -> Run:
    first: dict[int, float] = {}
    started = time.perf_counter()
    generations = []
    for i, (prompt, ref) in enumerate(zip(prompts, refs, strict=True)):
        request = GenerationRequest(record, prompt, adapter=ref, max_tokens=n, temperature=0, ignore_eos=True)

        def on_delta(_: Any, i: int = i) -> None:
            first.setdefault(i, time.perf_counter() - started)

        generations.append(engine.submit(request, on_delta))
    latencies = []
    for generation in generations:
        result = generation.result()
        assert result.completion_tokens == n
        latencies.append(time.perf_counter() - started)
    seconds = max(latencies)
    return Run(name, seconds, n * len(prompts), latencies, [first[i] for i in range(len(prompts))])


class FirstToken:
    """A logits processor that notes when `generate` first asks for the next token's scores."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self.at is None:
            self.at = time.perf_counter()
        return scores


def run_peft_mixed(peft_model: Any, tokenizer: Any, prompts: list[list[int]], names: list[str], n: int) -> Run:
    from transformers import LogitsProcessorList

    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(peft_model.parameters()).device
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    marker = FirstToken()
    started = time.perf_counter()
    with torch.inference_mode():
        out = peft_model.generate(
            input_ids=ids,
            attention_mask=mask,
            adapter_names=names,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=pad,
            logits_processor=LogitsProcessorList([marker]),
        )
    seconds = time.perf_counter() - started
    assert out.shape[1] - width == n
    assert marker.at is not None
    return Run(
        "(b) peft mixed batch",
        seconds,
        n * len(prompts),
        [seconds] * len(prompts),
        [marker.at - started] * len(prompts),
    )


def run_one_at_a_time(peft_model: Any, tokenizer: Any, prompts: list[list[int]], names: list[str], n: int) -> Run:
    from transformers import LogitsProcessorList

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(peft_model.parameters()).device
    latencies, first = [], []
    started = time.perf_counter()
    with torch.inference_mode():
        for prompt, name in zip(prompts, names, strict=True):
            peft_model.set_adapter(name)
            marker = FirstToken()
            ids = torch.tensor([prompt], device=device)
            peft_model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=pad,
                logits_processor=LogitsProcessorList([marker]),
            )
            assert marker.at is not None
            first.append(marker.at - started)
            latencies.append(time.perf_counter() - started)
    return Run("(c) one at a time", max(latencies), n * len(prompts), latencies, first)


def cold_start(
    engine: GenerationEngine, record: ModelRecord, prompt: list[int], adapters: list[tuple[AdapterRef, Path]]
) -> tuple[float, float]:
    """Median time to the first token of a rank-8 adapter never loaded, and of the same adapter once cached."""
    cold, warm = [], []
    for ref, _ in adapters:
        for times in (cold, warm):
            started = time.perf_counter()
            engine.generate(GenerationRequest(record, prompt, adapter=ref, max_tokens=1, temperature=0))
            times.append(time.perf_counter() - started)
    return statistics.median(cold), statistics.median(warm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser, "--model", "--threads")
    parser.add_argument("--requests", type=int, default=16, help="concurrent requests, one adapter each")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    add_options(parser, "--device", "--dtype")
    args = parse_options(parser)
    n, count = args.tokens, args.requests
    with tempfile.TemporaryDirectory() as tmp:
        settings = bench_settings(Path(tmp), args)  # the converted models of the default data dir
        placement = torch_placement(args)
        storage = ObjectStorage.from_settings(settings)
        record = BUILTINS[args.model]
        models = ModelStore(settings.models_dir, None)
        tokenizer = models.tokenizer(record)
        env = environment(placement)
        print(f"model {args.model}, torch {env['torch']}, {env['threads']} threads, {env['placement']}")
        questions = (QUESTIONS * (count // len(QUESTIONS) + 1))[:count]
        prompts = [encode_chat_prompt(tokenizer, [{"role": "user", "content": q}]) for q in questions]
        print(
            f"{count} requests, prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
            f"{n} new tokens each"
        )
        ranks = [(8, 12, 16)[i % 3] for i in range(count)] + [8] * 5  # the last five: cold starts
        adapters = make_adapters(ranks, record, models, storage, Path(tmp) / "made", placement)
        served, spare = adapters[:count], adapters[count:]
        refs = [ref for ref, _ in served]

        engine = GenerationEngine(
            models=models,
            placement=placement,
            storage=storage,
            cache_dir=Path(tmp) / "cache",
            limits=serving_limits(max_batch=max(32, count)),
        )
        run_engine("warm-up", engine, record, prompts, refs, 2)  # loads the base model and every adapter
        # Alternated, best of two each: a shared machine's speed drifts by a fifth within a minute.
        bases, mixes = [], []
        for _ in range(2):
            bases.append(run_engine("(a) engine, base", engine, record, prompts, [None] * count, n))
            mixes.append(run_engine("engine, adapters", engine, record, prompts, refs, n))
        base = min(bases, key=lambda run: run.seconds)
        mixed = min(mixes, key=lambda run: run.seconds)
        cold, warm = cold_start(engine, record, prompts[0], spare)
        engine_peak = rss_peak_mib() / 1024
        engine.close()

        from peft import PeftModel

        peft_model: Any = None
        names = [f"a{i}" for i in range(count)]
        for (_, folder), name in zip(served, names, strict=True):
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(
                    models.load(record, placement), str(folder), adapter_name=name, torch_device=str(placement.device)
                )
            else:
                peft_model.load_adapter(str(folder), adapter_name=name, torch_device=str(placement.device))
        peft_model.eval()
        run_peft_mixed(peft_model, tokenizer, prompts[:2], names[:2], 2)  # warm-up
        peft = run_peft_mixed(peft_model, tokenizer, prompts, names, n)
        alone = run_one_at_a_time(peft_model, tokenizer, prompts, names, n)

        print()
        for run in (mixed, base, peft, alone):
            print(run.line())
        print()
        print(f"engine adapters / (a) engine base:      {mixed.throughput / base.throughput:5.2f}x   (target >= 0.8x)")
        print(f"engine adapters / (b) peft mixed batch: {mixed.throughput / peft.throughput:5.2f}x   (target >= 3x)")
        print(f"engine adapters / (c) one at a time:    {mixed.throughput / alone.throughput:5.2f}x   (target >= 5x)")
        print(
            f"first token, rank-8 adapter: cold {cold * 1000:.0f} ms, cached {warm * 1000:.0f} ms; "
            f"cold adds {(cold - warm) * 1000:.0f} ms   (target < 150 ms)"
        )
        print(
            f"peak RSS: {engine_peak:.2f} GiB after the engine runs, "
            f"{rss_peak_mib() / 1024:.2f} GiB after the baselines"
        )


if __name__ == "__main__":
    main()
