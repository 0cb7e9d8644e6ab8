"""Benchmarks of the hot paths, each printed as a ratio against a baseline measured in the same run.

    .venv/bin/python bench/bench_core.py [--model smollm2-135m-instruct] [--threads 2]

1. Upload validation: our line validator (JSON + schema + chat-template tokenization) against bare
   `json.loads` over the same file, in MB/s.
2. LoRA training step: tokens/s of a LoRA step through the worker's recipe path
   (`app.ml.training.loss.accumulate_gradients` under the default `train_max_batch_tokens` budget, gradient
   clipping, AdamW) against a full fine-tuning step of the same model and batch through the same path.
3. Generation: tokens/s of greedy generation through the serving engine with an adapter against the base
   model alone through the same engine, and the first (cold) adapter load time.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from collections.abc import Callable
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

from app.core.settings import Settings
from app.core.storage import ObjectStorage, read_chunks
from app.files.service import _scan
from app.files.validation import LineValidator
from app.ml import adapter_format
from app.ml.device import Placement, resolve_placement
from app.ml.formatting import encode_chat_prompt, encode_record
from app.ml.methods.base import BaseWeights, MethodContext
from app.ml.methods.lora import LoraHyperparameters, LoraMethod
from app.ml.models import BUILTINS, ModelStore
from app.ml.serving import AdapterRef, GenerationEngine, GenerationRequest
from app.ml.training.loss import accumulate_gradients


def best_of(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def bench_validation(tokenizer: object) -> None:
    record = {
        "messages": [
            {"role": "user", "content": "Summarize the plot of a long novel about the sea in two sentences."},
            {"role": "assistant", "content": "A captain hunts a white whale. Obsession sinks the ship."},
        ]
    }
    data = ("\n".join(json.dumps(record) for _ in range(2000)) + "\n").encode()
    mb = len(data) / 1e6

    def ours() -> None:
        _scan(read_chunks(io.BytesIO(data)), LineValidator(tokenizer, 100, model_id="bench"), 10**9)

    def baseline() -> None:
        for line in data.splitlines():
            json.loads(line)

    t_ours, t_base = best_of(ours, 3), best_of(baseline, 3)
    print(
        f"validation: {mb / t_ours:8.2f} MB/s ours, {mb / t_base:8.2f} MB/s json.loads only; "
        f"ratio ours/baseline time = {t_ours / t_base:.1f}x ({2000 / t_ours:.0f} lines/s)"
    )


def bench_training(
    model_id: str, models_dir: Path, tokenizer: Any, max_batch_tokens: int, placement: Placement
) -> None:
    example = encode_record(
        tokenizer,
        {
            "messages": [
                {"role": "user", "content": "Tell me about LoRA. " * 6},
                {"role": "assistant", "content": "Low-rank adapters train few parameters. " * 6},
            ]
        },
    )
    examples = [example] * 4
    tokens = sum(len(e.input_ids) for e in examples)

    def step_time(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> float:
        optimizer = torch.optim.AdamW(params, lr=1e-4)

        def step() -> None:  # one optimizer step as TrainingRecipe.train takes it
            accumulate_gradients(
                model,
                examples,
                pad_token_id=tokenizer.pad_token_id,
                max_batch_tokens=max_batch_tokens,
                placement=placement,
            )
            torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if placement.device.type == "cuda":
                torch.cuda.synchronize()  # time the work, not its queueing

        step()  # warm-up (allocations, lazy inits)
        return statistics.median(best_of(step, 1) for _ in range(5))

    record = BUILTINS[model_id]
    models = ModelStore(models_dir, None)
    hp = LoraHyperparameters().for_model(record)
    context = MethodContext(record=record, models=models, placement=placement)
    lora = LoraMethod().prepare(models.load(record, placement), hp, context)
    lora.train()
    t_lora = step_time(lora, [p for p in lora.parameters() if p.requires_grad])
    full = models.load(record, placement).float()  # full fine-tuning keeps float32 weights
    full.train()
    t_full = step_time(full, list(full.parameters()))
    print(
        f"training step ({tokens} tokens): LoRA {tokens / t_lora:8.1f} tok/s, full fine-tuning "
        f"{tokens / t_full:8.1f} tok/s; LoRA speed-up = {t_full / t_lora:.2f}x"
    )


def bench_generation(model_id: str, settings: Settings, tokenizer: object) -> None:
    storage = ObjectStorage.from_settings(settings)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapter"
        folder.mkdir()
        record = BUILTINS[model_id]
        models = ModelStore(settings.models_dir, storage)
        context = MethodContext(record=record, models=models, placement=resolve_placement("cpu", "float32"))
        lora = LoraMethod().prepare(models.load(record), LoraHyperparameters().for_model(record), context)
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)  # a non-trivial adapter
        LoraMethod().export(lora, folder, BaseWeights(record=record, weights_sha256=models.weights_sha256(record)))
        size, sha = adapter_format.pack(folder, Path(tmp) / "a.tar.gz", {"adapter_id": "adapter-bench"})
        storage.put_path("adapters/bench/adapter-bench.tar.gz", Path(tmp) / "a.tar.gz")
    engine = GenerationEngine(
        models=models,
        placement=resolve_placement(settings.device, settings.dtype),
        storage=storage,
        cache_dir=settings.data_dir / "cache",
        limits=serving_limits(max_adapters=4),
    )
    ref = AdapterRef("adapter-bench", "adapters/bench/adapter-bench.tar.gz", sha, "lora")
    prompt = encode_chat_prompt(tokenizer, [{"role": "user", "content": "Write a short poem about the sea."}])
    n = 48

    def run(adapter: AdapterRef | None) -> float:
        request = GenerationRequest(record, prompt, adapter=adapter, max_tokens=n, temperature=0)
        started = time.perf_counter()
        result = engine.generate(request)
        return result.completion_tokens / (time.perf_counter() - started)

    run(None)  # loads the base model
    started = time.perf_counter()
    engine.generate(GenerationRequest(record, prompt, adapter=ref, max_tokens=1, temperature=0))
    cold = time.perf_counter() - started
    base = statistics.median(run(None) for _ in range(3))
    with_adapter = statistics.median(run(ref) for _ in range(3))
    engine.close()
    print(
        f"generation ({n} tokens, greedy): base {base:6.1f} tok/s, with LoRA adapter {with_adapter:6.1f} tok/s; "
        f"adapter/base throughput = {with_adapter / base:.2f}; cold adapter load + 1 token = {cold * 1000:.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser, "--model", "--threads", "--device", "--dtype")
    args = parse_options(parser)
    with tempfile.TemporaryDirectory() as tmp:
        settings = bench_settings(Path(tmp), args)  # the converted models of the default data dir
        placement = torch_placement(args)
        tokenizer = ModelStore(settings.models_dir, None).tokenizer(BUILTINS[args.model])
        env = environment(placement)
        print(f"model {args.model}, torch {env['torch']}, {env['threads']} threads, on {env['placement']}")
        bench_validation(tokenizer)
        bench_training(args.model, settings.models_dir, tokenizer, settings.train_max_batch_tokens, placement)
        bench_generation(args.model, settings, tokenizer)


if __name__ == "__main__":
    main()
