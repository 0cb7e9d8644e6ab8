"""Check what an operator brings as a base model and stage it as a clean folder, with the facts the system needs.

Three sources: a Hugging Face model folder, a GGUF file (dequantized once), or a repo in the local Hugging Face
cache (resolved offline: nothing is downloaded). Every problem is a `ModelImportError` whose message names it,
raised before anything is stored or registered.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.ml.models.builtins import peft_default_target_modules
from app.ml.models.records import WEIGHT_INDEX, ModelFile, file_sha256

log = logging.getLogger(__name__)

MAX_CHAT_TEMPLATE_BYTES = 256 * 1024
MODEL_FILES = ("config.json", "generation_config.json", WEIGHT_INDEX)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)
SAMPLE_CHAT = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


class ModelImportError(ValueError):
    """The model cannot be registered; the message says why, for the operator."""


@dataclass(frozen=True)
class ModelFacts:
    architecture: str
    n_parameters: int
    max_seq_length: int
    chat_template: bool
    linear_modules: tuple[str, ...]
    default_target_modules: tuple[str, ...]
    n_layers: int
    tool_call_format: str | None = None


def resolve_hf_repo(repo: str, revision: str | None) -> Path:
    """The snapshot folder of `repo` in the local Hugging Face cache (HF_HOME), never downloading."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    name = f"{repo}@{revision}" if revision else repo
    try:
        return Path(snapshot_download(repo_id=repo, revision=revision, local_files_only=True))
    except HFValidationError:
        raise ModelImportError(f"{repo!r} is not a Hugging Face repo name (ORG/NAME)") from None
    except (LocalEntryNotFoundError, FileNotFoundError):
        raise ModelImportError(
            f"{name} is not in the local Hugging Face cache (HF_HOME); nothing is downloaded at run time: "
            f"fetch it on a machine with network access (`hf download {repo}`) and copy the cache here"
        ) from None


def stage_folder(src: Path, dest: Path, *, links_within: Path | None = None) -> None:
    """Copy the model's config, safetensors weights and tokenizer files from `src` into the empty folder `dest`.

    Only the folder's own files: a symbolic link anywhere in it is refused (it could make the import copy any file
    this user may read into the object store), unless `links_within` is given and the link points inside it (the
    Hugging Face cache's own links, see `stage_hf_snapshot`).
    """
    if not src.is_dir():
        raise ModelImportError(f"{src} is not a folder")
    _refuse_links(src, links_within)
    if not (src / "config.json").is_file():
        raise ModelImportError(f"{src} has no config.json: it is not a Hugging Face model folder")
    weights = _weight_files(src)
    if not weights:
        pickled = [p.name for p in src.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
        if pickled:
            raise ModelImportError(
                f"{src} has weights only as PyTorch pickles ({', '.join(sorted(pickled)[:3])}); Tuneforge loads "
                "safetensors only (pickles can run code): save the model with save_pretrained(safe_serialization=True)"
            )
        raise ModelImportError(f"{src} has no weights (*.safetensors)")
    tokenizer = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    if not any(name in tokenizer for name in ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json")):
        raise ModelImportError(
            f"{src} has no tokenizer (tokenizer.json, tokenizer.model, or vocab.json with merges.txt)"
        )
    for path in [*(src / name for name in MODEL_FILES), *weights, *(src / name for name in tokenizer)]:
        if path.is_file():
            _copy_file(path, dest / path.name, follow_links=links_within is not None)


def stage_hf_snapshot(snapshot: Path, dest: Path) -> None:
    """`stage_folder` for a snapshot of the Hugging Face cache (`models--ORG--NAME/snapshots/COMMIT`), whose files
    are links into the repo's own `blobs/`: those links are followed (the bytes are copied, not the link); a link
    that leaves the repo's cache folder is refused as in any other folder."""
    stage_folder(snapshot, dest, links_within=snapshot.resolve().parents[1])


def _refuse_links(src: Path, links_within: Path | None) -> None:
    allowed = links_within.resolve() if links_within is not None else None
    for root, dirs, files in os.walk(src):  # links to folders are listed, not entered
        for name in sorted([*dirs, *files]):
            path = Path(root) / name
            if not path.is_symlink():
                continue
            if allowed is not None and path.resolve().is_relative_to(allowed):
                continue
            raise ModelImportError(
                f"{path} is a symbolic link (to {os.readlink(path)}): a model folder must hold its own files, not "
                "links to others; copy the files in (cp -L) and add the folder again"
            )


def _copy_file(src: Path, dest: Path, *, follow_links: bool) -> None:
    """Copy the bytes of `src`; without `follow_links`, refused when it has become a link since it was checked."""
    try:
        fd = os.open(src, os.O_RDONLY | (0 if follow_links else os.O_NOFOLLOW))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ModelImportError(f"{src} is a symbolic link: a model folder must hold its own files") from None
        raise
    with os.fdopen(fd, "rb") as source, dest.open("wb") as target:
        shutil.copyfileobj(source, target, 1 << 20)


def _weight_files(src: Path) -> list[Path]:
    """The safetensors files the model loads: those its index lists when it is sharded, else model.safetensors,
    else every *.safetensors (extra copies such as Mistral's consolidated.safetensors are left out)."""
    index = src / WEIGHT_INDEX
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelImportError(f"{WEIGHT_INDEX} cannot be read: it has no weight_map") from None
        for name in sorted(map(str, shards)):
            # A plain file name of this folder: never ../x, /x or a/x (the weights are staged next to the index).
            if name in ("", ".", "..") or Path(name).name != name:
                raise ModelImportError(
                    f"{WEIGHT_INDEX} names {name[:200]!r} in its weight_map, which is not a file of this folder: "
                    "every weight file must sit next to the index"
                )
        missing = sorted(name for name in shards if not (src / str(name)).is_file())
        if missing:
            raise ModelImportError(f"{WEIGHT_INDEX} lists weight files that are not there: {', '.join(missing[:3])}")
        return sorted(src / str(name) for name in shards)
    if (src / "model.safetensors").is_file():
        return [src / "model.safetensors"]
    return sorted(p for p in src.glob("*.safetensors") if p.is_file())


def stage_gguf(gguf: Path, dest: Path) -> None:
    """Dequantize a GGUF file into `dest` (safetensors weights and its tokenizer)."""
    from app.ml.models.builtins import convert_gguf

    if not gguf.is_file():
        raise ModelImportError(f"{gguf} is not a file")
    try:
        convert_gguf(gguf, dest)
    except Exception as exc:
        log.debug("GGUF conversion failed", exc_info=True)
        raise ModelImportError(
            f"{gguf.name} could not be read as a GGUF causal language model ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None


def set_chat_template(dest: Path, template_file: Path) -> None:
    """Use the Jinja chat template in `template_file` (it takes precedence over one in tokenizer_config.json)."""
    if not template_file.is_file():
        raise ModelImportError(f"--chat-template: {template_file} is not a file")
    data = template_file.read_bytes()[: MAX_CHAT_TEMPLATE_BYTES + 1]
    if len(data) > MAX_CHAT_TEMPLATE_BYTES:
        raise ModelImportError(f"--chat-template: {template_file} is larger than {MAX_CHAT_TEMPLATE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ModelImportError(f"--chat-template: {template_file} is not UTF-8 text") from None
    (dest / "chat_template.json").unlink(missing_ok=True)
    (dest / "chat_template.jinja").write_text(text, encoding="utf-8")


def linear_module_names(model: Any) -> tuple[str, ...]:
    """The distinct names of the linear layers in the model's blocks (the output layer excluded): what LoRA's
    `target_modules` may name. GPT-2-style Conv1D layers count as linear, as they do for PEFT."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings()
    names: list[str] = []
    for name, module in model.named_modules():
        if module is output or not isinstance(module, nn.Linear | Conv1D):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in names:
            names.append(leaf)
    return tuple(names)


def _is_causal_lm(config: Any) -> bool:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        return False
    architectures = getattr(config, "architectures", None) or []
    return not architectures or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


def check_tool_call_format(name: str | None) -> None:
    """A tool-call format an operator names is one Tuneforge reads (before any file is copied)."""
    from app.ml.tool_calls import FORMATS

    if name is not None and name not in FORMATS:
        raise ModelImportError(f"--tool-call-format {name[:64]!r} is not one of {', '.join(FORMATS)}")


def inspect(folder: Path, *, max_seq_length: int | None, tool_call_format: str | None = None) -> ModelFacts:
    """Load the staged model and its tokenizer once, check they make a usable causal LM, and describe it.

    `tool_call_format` names how the chat template writes tool calls, where it is not one Tuneforge detects."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from app.ml.formatting import encode_chat
    from app.ml.tool_calls import detect_tool_call_format, renders_tool_calls

    check_tool_call_format(tool_call_format)

    try:
        config = AutoConfig.from_pretrained(str(folder))
    except Exception as exc:
        raise ModelImportError(
            f"config.json cannot be read by this transformers version ({str(exc).splitlines()[0][:200]}); "
            "models that need custom code (trust_remote_code) are not supported"
        ) from None
    if not _is_causal_lm(config):
        kinds = ", ".join(getattr(config, "architectures", None) or [config.model_type])
        raise ModelImportError(f"the model is not a causal language model ({kinds}); Tuneforge fine-tunes causal LMs")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:
        raise ModelImportError(f"the tokenizer cannot be loaded ({str(exc).splitlines()[0][:200]})") from None
    if tokenizer.eos_token_id is None:
        raise ModelImportError("the tokenizer has no end-of-sequence token: completions could never end")
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto", output_loading_info=True)
        model, info = loaded
    except Exception as exc:
        raise ModelImportError(f"the weights cannot be loaded ({str(exc).splitlines()[0][:300]})") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ModelImportError(
            f"the weights lack {len(missing)} tensor(s) the model needs, e.g. {', '.join(missing[:3])}"
        )
    positions = getattr(config, "max_position_embeddings", None)
    if max_seq_length is None:
        if not positions:
            raise ModelImportError("config.json does not say how many positions the model has: pass --max-seq-length")
        max_seq_length = int(positions)
    elif positions and max_seq_length > positions:
        raise ModelImportError(f"--max-seq-length {max_seq_length} is above the model's {positions} positions")
    elif max_seq_length < 16:
        raise ModelImportError("--max-seq-length must be at least 16")
    chat = tokenizer.chat_template is not None
    if chat:
        try:
            encode_chat(tokenizer, SAMPLE_CHAT)
        except Exception as exc:
            raise ModelImportError(
                f"the chat template cannot render a user/assistant conversation turn by turn ({str(exc)[:200]})"
            ) from None
    detected = detect_tool_call_format(tokenizer) if chat else None
    if tool_call_format is not None:
        if detected is not None and detected != tool_call_format:
            raise ModelImportError(
                f"--tool-call-format {tool_call_format}: the chat template writes tool calls as {detected}; leave the "
                "option out (it is detected)"
            )
        if not renders_tool_calls(tokenizer):
            raise ModelImportError(
                f"--tool-call-format {tool_call_format}: the chat template does not render tools, tool calls and "
                "their results; give one that does (--chat-template FILE)"
            )
    linear = linear_module_names(model)
    return ModelFacts(
        architecture=str(config.model_type),
        n_parameters=sum(p.numel() for p in model.parameters()),
        max_seq_length=max_seq_length,
        chat_template=chat,
        linear_modules=linear,
        default_target_modules=peft_default_target_modules(str(config.model_type), linear),
        n_layers=int(config.num_hidden_layers),
        tool_call_format=tool_call_format or detected,
    )


def manifest(folder: Path) -> list[ModelFile]:
    """Every file of the staged folder with its sha256 and size."""
    return [
        ModelFile(path=path.name, sha256=file_sha256(path), size=path.stat().st_size)
        for path in sorted(folder.iterdir())
    ]
