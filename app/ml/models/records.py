"""What a base model is (`ModelRecord`, its files) and the digests that identify it."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BLOB_PREFIX = "models/blobs/sha256"
# Files that hold weights: the tokenizer alone (what the API needs to count tokens) is every other file.
WEIGHT_SUFFIXES = (".safetensors",)
WEIGHT_INDEX = "model.safetensors.index.json"
SHA256 = re.compile(r"[0-9a-f]{64}")


class ModelUnavailable(RuntimeError):
    """A base model cannot be materialized here (a package is missing, a stored file is missing or damaged)."""


@dataclass(frozen=True)
class ModelFile:
    path: str  # relative to the model folder, a plain file name
    sha256: str
    size: int

    @property
    def is_weights(self) -> bool:
        return self.path.endswith(WEIGHT_SUFFIXES) or self.path == WEIGHT_INDEX

    @property
    def blob_key(self) -> str:
        return f"{BLOB_PREFIX}/{self.sha256}"


@dataclass(frozen=True)
class ModelRecord:
    """What the whole system needs to know about a base model, for built-ins and registered ones alike."""

    id: str
    description: str
    source: str  # builtin | path | gguf | hf-repo
    architecture: str  # the transformers model_type: llama, qwen2, gpt2, ...
    n_parameters: int
    max_seq_length: int
    chat_template: bool  # whether the tokenizer has a chat template (chat files and `messages` need one)
    linear_modules: tuple[str, ...]  # names of the linear layers in its blocks (what LoRA may target)
    default_target_modules: tuple[str, ...]  # LoRA's default: PEFT's mapping for the architecture
    revision: str  # sha256 of the file manifest (built-ins: a fixed tag)
    tokenizer_sha256: str  # identity of the tokenizer and chat template: token counts are shared between equals
    origin: str | None = None  # a Hugging Face repo name, written as `base_model_name_or_path` in adapters
    n_layers: int | None = None  # transformer blocks (None: registered before this was recorded)
    # How its chat template writes tool calls (app.ml.tool_calls.FORMATS); None: the template has no tool support.
    tool_call_format: str | None = None
    files: tuple[ModelFile, ...] = ()
    created_at: datetime = field(default_factory=lambda: datetime(2026, 11, 1, tzinfo=UTC))

    @property
    def builtin(self) -> bool:
        return self.source == "builtin"

    @property
    def owned_by(self) -> str:
        return "tuneforge" if self.builtin else "operator"

    @property
    def base_model_name_or_path(self) -> str:
        return self.origin or self.id


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def pad_token_id(tokenizer: Any) -> int:
    """The id that pads batches: the tokenizer's pad token, or its end-of-sequence token where it has none
    (GPT-2). Padded positions are masked out of attention and loss, so which id it is does not matter."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad)


def manifest_revision(files: list[ModelFile] | tuple[ModelFile, ...]) -> str:
    """The model's revision: a sha256 over its files' names and digests, so equal bytes give equal revisions."""
    digest = hashlib.sha256()
    for item in sorted(files, key=lambda f: f.path):
        digest.update(f"{item.path}\0{item.sha256}\n".encode())
    return digest.hexdigest()


def tokenizer_identity(files: list[ModelFile] | tuple[ModelFile, ...]) -> str:
    """A sha256 over the files a tokenizer loads from (every non-weight file but the model config)."""
    return manifest_revision(
        [f for f in files if not f.is_weights and f.path not in ("config.json", "generation_config.json")]
    )
