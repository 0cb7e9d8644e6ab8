"""What callers hand the serving engine and what they get back: requests, their results and streamed deltas."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from app.ml.models import ModelRecord

if TYPE_CHECKING:
    from app.ml.serving.grammar import Grammar
    from app.ml.serving.kinds import ServingKind

# Below this temperature sampling is numerically greedy (logits / T overflow): decode greedily, as vLLM does.
GREEDY_BELOW_TEMPERATURE = 1e-5
# Alternatives a request may ask for at each position (`logprobs`): OpenAI's chat bound.
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class AdapterRef:
    id: str
    storage_key: str
    sha256: str
    method: str  # its fine-tuning method, whose serving kind applies it

    @property
    def kind(self) -> ServingKind:
        """How the engine applies it: its method's serving kind."""
        from app.ml.methods import METHODS  # the methods name their kinds (and import this package)

        return METHODS[self.method].serving


@dataclass
class GenerationRequest:
    model: ModelRecord
    input_ids: list[int]
    adapter: AdapterRef | None = None
    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None  # one generator per request: the same seed gives the same text in any batch
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: none; k: the chosen token's log-probability and the k most likely
    ignore_eos: bool = False  # go on past the end-of-sequence token to max_tokens (benchmarks, as vLLM's)
    # OpenAI's penalties: a token's logit less `presence_penalty` once this row generated it, and less
    # `frequency_penalty` times the times it did (the prompt's tokens do not count).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit before sampling
    grammar: Grammar | None = None  # the output must match it (structured outputs); the row ends when it is complete
    # Decode special tokens into the text, all but the end of sequence (tool-call markers such as Mistral's
    # [TOOL_CALLS] are special tokens, and the calls are read from the text).
    special_tokens: bool = False
    owner: str | None = None  # whose request (a tenant): the waiting line is fair across owners, each one bounded

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (before temperature, top-k and top-p), with the most
    likely alternatives at its position."""

    token: str
    token_id: int
    logprob: float
    top: list[tuple[str, int, float]]  # (token, id, log-probability), most likely first


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    # "stop" (end of sequence, a stop string, or the grammar complete), "length" (max_tokens) or "cancelled"
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Delta:
    """New output of a streamed request since the last delta; `finish_reason` is set on the last one."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


class Generation:
    """A submitted request: its result (a future), its deltas (to `on_delta`, from the engine thread) and `cancel`,
    which frees its place in the batch at the next step."""

    def __init__(self, request: GenerationRequest, on_delta: Callable[[Delta], None] | None = None) -> None:
        self.request = request
        self.on_delta = on_delta
        self.future: Future[GenerationResult] = Future()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def result(self, timeout: float | None = None) -> GenerationResult:
        return self.future.result(timeout)


class AdapterUnavailable(RuntimeError):
    """An adapter's stored archive is missing, damaged or does not fit its base model; only its requests fail."""

    def __init__(self, adapter_id: str, reason: str) -> None:
        super().__init__(f"adapter {adapter_id}: {reason}")
        self.adapter_id = adapter_id
        self.reason = reason


class EngineOverloaded(RuntimeError):
    """The engine's queue of waiting requests is full: the caller should try again later."""

    def __init__(self, waiting: int) -> None:
        super().__init__(f"the serving engine has {waiting} requests waiting; try again shortly")
        self.waiting = waiting


class OwnerOverloaded(RuntimeError):
    """The request's owner already has as many requests in the engine (waiting or running) as it may."""

    def __init__(self, owner: str, held: int) -> None:
        super().__init__(f"{owner} has {held} requests in the serving engine, its limit; try again shortly")
        self.held = held


class EngineClosed(RuntimeError):
    """The engine was shut down before the request finished."""
