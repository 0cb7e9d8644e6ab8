"""Base models: what each one is (`ModelRecord`), the built-ins, and their files and tokenizers on this machine
(`ModelStore`). Registered models are looked up in the database by the models domain (app/models/)."""

from app.ml.models.builtins import (
    BUILTIN_REVISION,
    BUILTIN_TOKENIZER,
    BUILTINS,
    LLAMA_LINEAR_MODULES,
    SMOLLM2_GGUF,
    convert_gguf,
    peft_default_target_modules,
    smollm2_gguf_dir,
)
from app.ml.models.records import (
    BLOB_PREFIX,
    WEIGHT_INDEX,
    ModelFile,
    ModelRecord,
    ModelUnavailable,
    file_sha256,
    manifest_revision,
    pad_token_id,
    tokenizer_identity,
)
from app.ml.models.store import ModelStore

__all__ = [
    "BLOB_PREFIX",
    "BUILTINS",
    "BUILTIN_REVISION",
    "BUILTIN_TOKENIZER",
    "LLAMA_LINEAR_MODULES",
    "SMOLLM2_GGUF",
    "WEIGHT_INDEX",
    "ModelFile",
    "ModelRecord",
    "ModelStore",
    "ModelUnavailable",
    "convert_gguf",
    "file_sha256",
    "manifest_revision",
    "pad_token_id",
    "peft_default_target_modules",
    "smollm2_gguf_dir",
    "tokenizer_identity",
]
