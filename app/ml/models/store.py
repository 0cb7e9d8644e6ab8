"""The base models of one process: local folders (built, or fetched from the object store once, checked against
their digests) and loaded tokenizers.

Models an operator registers with `tuneforge models add` have their files in the object store under
`models/blobs/sha256/<digest>`, content-addressed; a machine materializes them into its local cache on first use
and verifies every file's sha256 as it arrives.
"""

from __future__ import annotations

import copy
import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock

from app.ml.blobs import BlobStore
from app.ml.models.builtins import _BUILD, _CONFIG, build_shared_tokenizer
from app.ml.models.records import SHA256, ModelFile, ModelRecord, ModelUnavailable, file_sha256, manifest_revision

if TYPE_CHECKING:
    from app.ml.device import Placement

log = logging.getLogger(__name__)


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


def _fetch_files(record: ModelRecord, folder: Path, storage: BlobStore, files: list[ModelFile]) -> None:
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

    def __init__(self, models_dir: Path, storage: BlobStore | None) -> None:
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
        # One load at a time: concurrent first requests would each load it, and transformers' lazy first import
        # is not thread-safe (another thread can see `AutoTokenizer` missing from a half-imported module).
        with _load_lock:
            with _cache_lock:
                cached = _tokenizers.get(key)
            if cached is not None:
                return cached
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_dir(record)))
            with _cache_lock:
                return _tokenizers.setdefault(key, tokenizer)

    def config(self, record: ModelRecord) -> Any:
        """The model's transformers config (a copy of its own: methods change what they build from it), read once
        per process and without its weights: a registered model's `config.json` comes with its tokenizer files; a
        built-in's is read from its folder once built, else made as its build makes it."""
        key = (record.id, record.revision, str(self.models_dir))
        with _cache_lock:
            cached = _configs.get(key)
        if cached is not None:
            return copy.deepcopy(cached)
        from transformers import AutoConfig

        built = self.models_dir / record.id
        if not record.builtin:
            config = AutoConfig.from_pretrained(str(self.tokenizer_dir(record)))
        elif (built / "config.json").exists():
            config = AutoConfig.from_pretrained(str(built))
        else:
            config = _CONFIG[record.id](self._shared_tokenizer_dir())
        with _cache_lock:
            return copy.deepcopy(_configs.setdefault(key, config))

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
_load_lock = threading.Lock()  # tokenizers load one at a time (see ModelStore.tokenizer)
_tokenizers: dict[tuple[str, str, str], Any] = {}
_weights_sha256: dict[tuple[str, str, str], str] = {}
_configs: dict[tuple[str, str, str], Any] = {}
