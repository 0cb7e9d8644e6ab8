"""The generation engine: one base model per process, many adapters, requests served from a queue.

Callers `submit` a request and get a future. One thread owns the models, so requests never race on
adapter state. Adapters load lazily: object store -> local disk -> memory, with an LRU bound.

How an adapter is applied depends on its method's artifact (app/ml/methods/): PEFT adapters are served from one
PeftModel per serving group (LoRA's, IA3's, each prompt-learning method's), each over its own copy of the base
model, since PEFT cannot mix those types in one model; weight-delta adapters (head, layerwise, discriminative,
full) swap their tensors into the plain base model for the request and back. The plain base model serves
requests without an adapter.
(A continuous-batching engine that mixes adapters inside one batch replaces this loop later; the
`submit` interface stays.)
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
from collections import OrderedDict
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.core.storage import ObjectStorage
from app.ml import adapter_format
from app.ml.device import Placement
from app.ml.methods.base import GenerationCall
from app.ml.registry import ModelRecord, ModelStore, pad_token_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterRef:
    id: str
    storage_key: str
    sha256: str
    method: str = "lora"  # whose `attach` adds it to a base model


@dataclass
class GenerationRequest:
    model: ModelRecord
    input_ids: list[int]
    adapter: AdapterRef | None = None
    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


# Base models kept loaded at once; a request for another unloads the least recently used one.
MAX_BASE_MODELS = 2
# Weight-delta adapters (head, layerwise, discriminative, full) kept loaded per base model may take at most this
# many times the base model's bytes (a `full` delta is a whole model); the least recently used go first.
MAX_DELTA_MODELS = 2

# Below this temperature sampling is numerically greedy (logits / T overflow): decode greedily, as vLLM does.
GREEDY_BELOW_TEMPERATURE = 1e-5


class AdapterUnavailable(RuntimeError):
    """An adapter's stored archive is missing or does not match its checksum; only its requests fail."""

    def __init__(self, adapter_id: str, reason: str) -> None:
        super().__init__(f"adapter {adapter_id}: {reason}")
        self.adapter_id = adapter_id
        self.reason = reason


class StopOnStrings:
    """A transformers stopping criterion: stop once any stop string appears in the generated text.

    It decodes only a window at the end of the sequence, long enough to hold the longest stop string
    (a character is at most 4 byte-level tokens), so its cost per step is bounded by the stop strings'
    bounded length, unlike transformers' `stop_strings`, whose tables grow with the vocabulary times
    the string length.
    """

    def __init__(self, tokenizer: Any, stops: list[str], prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.prompt_length = prompt_length
        self.window = 4 * max(len(stop) for stop in stops) + 4

    def __call__(self, input_ids: Any, scores: Any, **_: Any) -> Any:
        import torch

        start = max(self.prompt_length, input_ids.shape[1] - self.window)
        tails = self.tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
        done = [any(stop in tail for stop in self.stops) for tail in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@dataclass
class _LoadedBase:
    """A base model in memory with what is attached to it."""

    plain: Any  # changed only inside a weight delta's request: serves requests without an adapter
    weights_sha256: str  # what weight-delta artifacts must have been trained on
    model_bytes: int  # of the plain model: weight deltas kept loaded may take at most MAX_DELTA_MODELS times this
    groups: dict[str, Any] = field(default_factory=dict)  # PEFT serving group -> its PeftModel
    # adapter id -> its PEFT group, or its loaded weight delta; least recently used first
    adapters: OrderedDict[str, str | Any] = field(default_factory=OrderedDict)


class GenerationEngine:
    def __init__(
        self, *, models: ModelStore, placement: Placement, storage: ObjectStorage, cache_dir: Path, max_adapters: int
    ) -> None:
        self.models = models
        self.placement = placement
        self.storage = storage
        self.cache_dir = cache_dir
        self.max_adapters = max_adapters
        # (base model id, revision) -> the loaded base model and its adapters, least recently used first
        self._models: OrderedDict[tuple[str, str], _LoadedBase] = OrderedDict()
        self._queue: queue.Queue[tuple[GenerationRequest, Future[GenerationResult]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="generation-engine", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest) -> Future[GenerationResult]:
        future: Future[GenerationResult] = Future()
        self._queue.put((request, future))
        return future

    def generate(self, request: GenerationRequest) -> GenerationResult:
        return self.submit(request).result()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    # --- the engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            request, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self._generate(request))
            except BaseException as exc:  # the caller gets the error; the engine keeps serving
                future.set_exception(exc)

    def _local_adapter(self, ref: AdapterRef) -> Path:
        folder = self.cache_dir / ref.id
        if (folder / adapter_format.MANIFEST).exists():
            return folder
        archive = self.cache_dir / f"{ref.id}.tar.gz"
        try:
            sha = self.storage.download(ref.storage_key, archive)
        except FileNotFoundError:
            raise AdapterUnavailable(ref.id, "its stored files are missing") from None
        if sha != ref.sha256:
            archive.unlink(missing_ok=True)
            log.error("adapter %s: checksum mismatch (%s != %s)", ref.id, sha, ref.sha256)
            raise AdapterUnavailable(ref.id, "its stored files are damaged (checksum mismatch)")
        adapter_format.unpack(archive, folder)
        archive.unlink(missing_ok=True)
        return folder

    def _base(self, record: ModelRecord) -> _LoadedBase:
        key = (record.id, record.revision)
        loaded = self._models.get(key)
        if loaded is None:
            while len(self._models) >= MAX_BASE_MODELS:  # make room first: device memory holds few base models
                unloaded, _ = self._models.popitem(last=False)
                log.info("unloaded base model %s to make room", unloaded[0])
            plain = self.models.load(record, self.placement)
            loaded = self._models[key] = _LoadedBase(
                plain=plain,
                weights_sha256=self.models.weights_sha256(record),
                model_bytes=sum(p.numel() * p.element_size() for p in plain.parameters()),
            )
        self._models.move_to_end(key)
        return loaded

    def _model_for(
        self, record: ModelRecord, adapter: AdapterRef | None, input_ids: Any
    ) -> tuple[GenerationCall, AbstractContextManager[Any]]:
        """How to generate from `input_ids`, and the context to generate in (a weight delta applied for its span)."""
        import torch

        from app.ml.methods import METHODS
        from app.ml.methods.base import PeftMethod
        from app.ml.methods.delta import applied, load_delta

        loaded = self._base(record)
        plain = GenerationCall(
            loaded.plain, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}, input_ids.shape[1]
        )
        if adapter is None:
            return plain, nullcontext()
        if adapter.id not in loaded.adapters:
            method = METHODS[adapter.method]
            folder = self._local_adapter(adapter)
            if isinstance(method, PeftMethod):
                group = method.serving_group
                # LoRA and IA3 inject layers into the model they wrap: they get a copy of their own.
                fresh = loaded.plain if method.leaves_base_unchanged else copy.deepcopy(loaded.plain)
                model = loaded.groups.get(group) or fresh
                loaded.groups[group] = method.attach(model, folder, adapter.id, str(self.placement.device))
                loaded.groups[group].eval()
                loaded.adapters[adapter.id] = group
            else:
                loaded.adapters[adapter.id] = load_delta(
                    folder,
                    weights_sha256=loaded.weights_sha256,
                    device=self.placement.device,
                    dtype=self.placement.dtype,
                )
            while len(loaded.adapters) > self.max_adapters:
                self._evict(loaded, *loaded.adapters.popitem(last=False))
            # Then the least recently used weight deltas (not the one just loaded) until they fit their bound.
            for older in [key for key, attached in loaded.adapters.items() if not isinstance(attached, str)][:-1]:
                if self._delta_bytes(loaded) <= MAX_DELTA_MODELS * loaded.model_bytes:
                    break
                del loaded.adapters[older]
        loaded.adapters.move_to_end(adapter.id)
        attached = loaded.adapters[adapter.id]
        if isinstance(attached, str):
            method = METHODS[adapter.method]
            assert isinstance(method, PeftMethod)
            return method.generation_call(loaded.groups[attached], adapter.id, input_ids), nullcontext()
        return plain, applied(loaded.plain, attached)

    @staticmethod
    def _delta_bytes(loaded: _LoadedBase) -> int:
        return sum(attached.n_bytes for attached in loaded.adapters.values() if not isinstance(attached, str))

    @staticmethod
    def _evict(loaded: _LoadedBase, adapter_id: str, attached: str | Any) -> None:
        if not isinstance(attached, str):
            return  # a weight delta: dropping the reference frees it
        if attached in loaded.adapters.values():
            loaded.groups[attached].delete_adapter(adapter_id)
        else:  # the group's last adapter: its copy of the base model goes too
            del loaded.groups[attached]

    def _generate(self, request: GenerationRequest) -> GenerationResult:
        import torch
        from transformers import StoppingCriteriaList

        from app.ml.methods.delta import DeltaMismatch

        tokenizer = self.models.tokenizer(request.model)
        input_ids = torch.tensor([request.input_ids], dtype=torch.long, device=self.placement.device)
        kwargs: dict[str, Any] = {
            "max_new_tokens": request.max_tokens,
            "pad_token_id": pad_token_id(tokenizer),
            "eos_token_id": tokenizer.eos_token_id,
        }
        if request.temperature >= GREEDY_BELOW_TEMPERATURE:
            kwargs.update(do_sample=True, temperature=request.temperature, top_p=request.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        try:
            call, context = self._model_for(request.model, request.adapter, input_ids)
            if request.stop:
                kwargs["stopping_criteria"] = StoppingCriteriaList(
                    [StopOnStrings(tokenizer, request.stop, prompt_length=call.new_tokens_from)]
                )
            if request.seed is not None:  # after loading, whose initializations draw from the generator too
                torch.manual_seed(request.seed)  # seeds the CUDA generators too
            with torch.inference_mode(), context:
                output = call.model.generate(**call.inputs, **kwargs)
        except DeltaMismatch as exc:  # a weight delta made for other weights, or whose tensors do not fit
            assert request.adapter is not None
            raise AdapterUnavailable(request.adapter.id, f"it cannot be applied to {request.model.id}: {exc}") from None
        new_ids = output[0, call.new_tokens_from :].tolist()
        finish_reason = "length"
        if new_ids and new_ids[-1] == tokenizer.eos_token_id:
            finish_reason = "stop"
        text = tokenizer.decode(new_ids, skip_special_tokens=True)
        for stop in request.stop:
            cut = text.find(stop)
            if cut != -1:
                text = text[:cut]
                finish_reason = "stop"
        return GenerationResult(
            text=text,
            token_ids=new_ids,
            prompt_tokens=len(request.input_ids),
            completion_tokens=len(new_ids),
            finish_reason=finish_reason,
        )
