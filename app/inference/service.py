"""Text generation for both APIs (native `/generate`, OpenAI's `/v1/completions` and `/v1/chat/completions`).

`prepare` resolves the model (tenant-scoped), tokenizes and checks the bounds, in a short database session of its
own (none is held while text is generated); `complete` and `Stream` run the request on the serving engine,
waiting for the whole text or streaming it, and cancel it the moment the client goes away, which frees its row
of the batch. The services take domain arguments, not either API's HTTP bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from jinja2 import TemplateError
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.adapters.service import adapter_unavailable, get_servable
from app.core.db import session_scope
from app.core.errors import ErrorCode, InvalidInput, NotFound, ServiceUnavailable, TooManyRequests
from app.core.metrics import Metrics
from app.core.models import Adapter, Job
from app.core.settings import Settings
from app.ml.formatting import encode_chat_prompt, encode_prompt
from app.ml.models import ModelRecord, ModelStore, ModelUnavailable
from app.ml.objectives import stored_hyperparameters
from app.ml.serving import (
    AdapterRef,
    AdapterUnavailable,
    Delta,
    EngineClosed,
    EngineOverloaded,
    Generation,
    GenerationEngine,
    GenerationRequest,
    GenerationResult,
    OwnerOverloaded,
)
from app.ml.serving.grammar import ANY_OBJECT, GRAMMARS, JSON_OPTIONS, Grammar, GrammarError
from app.ml.serving.logits import GrammarFailed
from app.ml.tool_calls import call_grammar, special_tokens
from app.models.repository import find_model
from app.models.service import load_tokenizer, model_unavailable, require_model
from app.tinker.repository import adapter_ref, find_saved

TINKER_PATH = "tinker://"  # weights a Tinker run saved (app/tinker/)
# How often a waiting request checks whether its client is still there.
DISCONNECT_POLL_SECONDS = 0.1
# New tokens when a request does not say (OpenAI's chat API has no default): at most this, within the context.
DEFAULT_MAX_TOKENS = 512
# Retry-After (seconds) when the engine's waiting line is full.
OVERLOADED_RETRY_AFTER = 2


@dataclass(frozen=True)
class JsonFormat:
    """Output constrained to JSON: matching `schema`, or any JSON object (None)."""

    schema: dict[str, Any] | None
    name: str  # the schema's name, for messages
    param: str  # the request's field that gave the schema, named in errors


@dataclass(frozen=True)
class ToolUse:
    """Functions the model may call (OpenAI's `tools`), and how: `choice` "none" (text only), "auto" (the model
    decides; its answer is read as calls where it makes them), "required" (one call or more, constrained to the
    declared functions) or a function's name (`named`: one call of it, constrained)."""

    tools: list[dict[str, Any]]  # {"type": "function", "function": {"name", "description", "parameters"}}
    choice: str = "auto"
    named: bool = False
    parallel: bool = True  # "required" may make several calls (one answer, at most MAX_TOOL_CALLS)


@dataclass(frozen=True)
class Sampling:
    max_tokens: int | None = 128  # None: up to DEFAULT_MAX_TOKENS, within the model's context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None
    n: int = 1  # choices: as many requests in the engine, each its own row
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    json: JsonFormat | None = None


@dataclass(frozen=True)
class Prepared:
    request: GenerationRequest
    adapter_id: str | None
    base_model: str
    n: int = 1
    tool_call_format: str | None = None  # the answer is read as tool calls in this family's text (None: text)

    def choices(self) -> list[GenerationRequest]:
        """One engine request per choice; a seeded request's choices draw from seeds of their own (the same seed,
        the same choices)."""
        return [dataclasses.replace(self.request, seed=choice_seed(self.request.seed, i)) for i in range(self.n)]


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed choice `index` samples with: the request's own for the first, a 32-bit hash of both for the others
    (a CPU generator keeps only 32 bits of a seed)."""
    if seed is None or index == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:4], "big")


def resolve_model(session: Session, *, tenant_id: str, model: str) -> tuple[str | None, str | None]:
    """OpenAI's `model`: an adapter id, a checkpoint id, a base model id, or an adapter's name (the newest of that
    name). Returns (adapter id, None) or (None, base model id); 404 `model_not_found` otherwise."""
    if "\x00" in model:  # no model's id or name has one (and PostgreSQL refuses it in a query)
        raise NotFound(
            "the model's name holds a NUL character: no model has one", param="model", code=ErrorCode.model_not_found
        )
    if model.startswith(("adapter-", "ftckpt-", TINKER_PATH)):
        return model, None
    if find_model(session, model) is not None:
        return None, model
    named = session.scalars(
        select(Adapter.id)
        .where(Adapter.tenant_id == tenant_id, Adapter.name == model)
        .order_by(Adapter.created_at.desc())
        .limit(1)
    ).first()
    if named is not None:
        return named, None
    raise NotFound(
        f"the model {model[:80]!r} does not exist: use a base model id, or an adapter's id or name (GET /v1/models)",
        param="model",
        code=ErrorCode.model_not_found,
    )


def prepare(
    settings: Settings,
    models: ModelStore,
    *,
    tenant_id: str,
    adapter_id: str | None,
    base_model: str | None,
    prompt: str | None,
    messages: list[dict[str, Any]] | None,
    sampling: Sampling,
    model: str | None = None,  # OpenAI's `model`, resolved to an adapter or a base model
    param: str = "adapter_id",
    tools: ToolUse | None = None,
) -> Prepared:
    with session_scope(settings.db_url) as session:  # the lookups only: no connection held while tokenizing
        if model is not None:
            adapter_id, base_model = resolve_model(session, tenant_id=tenant_id, model=model)
            param = "model"
        record, adapter_ref, virtual_tokens = _resolve(
            session, settings, tenant_id=tenant_id, adapter_id=adapter_id, base_model=base_model, param=param
        )
    _check_choices(settings, sampling.n)
    tokenizer = load_tokenizer(models, record)
    _check_logit_bias(tokenizer, sampling.logit_bias)
    calls_read = tools is not None and tools.choice != "none"
    if tools is not None or (messages and any(m["role"] == "tool" or "tool_calls" in m for m in messages)):
        _check_tool_support(record)
    if calls_read:
        assert tools is not None
        grammar = _tool_grammar(tokenizer, record, tools, sampling.json)
    else:
        grammar = _grammar(tokenizer, record, sampling.json) if sampling.json is not None else None
    if messages is not None:
        if tokenizer.chat_template is None:
            raise InvalidInput(
                f"{record.id} has no chat template: send `prompt` instead of `messages`",
                param="messages",
                code=ErrorCode.no_chat_template,
            )
        input_ids = _encode_chat(tokenizer, record, messages, tools)
    else:
        input_ids = encode_prompt(tokenizer, prompt or "")
    if not input_ids:
        raise InvalidInput("prompt is empty", param="prompt")
    limit = record.max_seq_length - virtual_tokens
    max_tokens = sampling.max_tokens or max(1, min(DEFAULT_MAX_TOKENS, limit - len(input_ids)))
    if len(input_ids) + max_tokens > limit:
        room = str(limit)
        if virtual_tokens:
            room += f" ({record.id} takes {record.max_seq_length}, less the adapter's {virtual_tokens} virtual tokens)"
        raise InvalidInput(
            f"prompt ({len(input_ids)} tokens) plus max_tokens ({max_tokens}) exceeds {room}", param="max_tokens"
        )
    request = GenerationRequest(
        model=record,
        adapter=adapter_ref,
        input_ids=input_ids,
        max_tokens=max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        seed=sampling.seed,
        stop=sampling.stop,
        logprobs=sampling.logprobs,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        logit_bias=sampling.logit_bias,
        grammar=grammar,
        special_tokens=calls_read,
        owner=tenant_id,
    )
    return Prepared(
        request=request,
        adapter_id=adapter_id,
        base_model=record.id,
        n=sampling.n,
        tool_call_format=record.tool_call_format if calls_read else None,
    )


def _check_tool_support(record: ModelRecord) -> None:
    """Tools and calls need a model whose chat template renders them and whose call format Tuneforge reads."""
    if record.tool_call_format is None:
        raise InvalidInput(
            f"{record.id} has no tool support: its chat template does not render tool calls in a format Tuneforge "
            "reads (register a model whose template does, naming it with --tool-call-format where needed)",
            param="tools",
            code=ErrorCode.no_tool_support,
        )


def _encode_chat(
    tokenizer: Any, record: ModelRecord, messages: list[dict[str, Any]], tools: ToolUse | None
) -> list[int]:
    """The conversation through the model's chat template, with the declared tools; a template that refuses it
    (one call at a time only, say) is a 422 in its own words."""
    try:
        return encode_chat_prompt(tokenizer, messages, tools=tools.tools if tools is not None else None)
    except Exception as exc:  # the template's own words when it refuses (raise_exception), else nothing internal
        said = f": {str(exc)[:300]}" if type(exc) is TemplateError else ""
        raise InvalidInput(
            f"the chat template of {record.id} cannot render this conversation{said}",
            param="messages",
            code=ErrorCode.template_error,
        ) from None


def _tool_grammar(
    tokenizer: Any, record: ModelRecord, tools: ToolUse, json_format: JsonFormat | None
) -> Grammar | None:
    """What the answer is constrained to: with `required` or a named function, calls to the declared functions (or
    that one) as the model's family writes them; with `auto` and a response format, calls or content in that
    format; with `auto` alone, nothing (the answer is read as calls where it makes them)."""
    assert record.tool_call_format is not None
    functions = [tool["function"] for tool in tools.tools]
    if tools.named:
        functions = [f for f in functions if f["name"] == tools.choice]
    elif tools.choice == "auto" and json_format is None:
        return None
    content = None
    if tools.choice == "auto" and json_format is not None:
        content = ANY_OBJECT if json_format.schema is None else json_format.schema
    grammar = call_grammar(
        record.tool_call_format,
        functions,
        parallel=tools.parallel and not tools.named,
        special=special_tokens(tokenizer),
        content=content,
        content_options=JSON_OPTIONS,
    )
    name = f"a call of {tools.choice!r}" if tools.named else "calls of the declared functions"
    try:
        return GRAMMARS.lark(tokenizer, tokenizer_key=(record.id, record.revision), grammar=grammar, name=name)
    except GrammarError as exc:
        raise InvalidInput(
            f"tools: the functions' parameters cannot be used to constrain the calls: {exc}",
            param="tools",
            code=ErrorCode.unsupported_schema,
        ) from None


def _check_choices(settings: Settings, n: int) -> None:
    """`n` within the server's bound, and within what one tenant may have in the engine at once."""
    bound = min(settings.serving_max_choices, settings.serving_max_requests_per_tenant)
    if n > bound:
        why = (
            "TUNEFORGE_SERVING_MAX_CHOICES"
            if bound == settings.serving_max_choices
            else "a tenant's requests in the engine at once (TUNEFORGE_SERVING_MAX_REQUESTS_PER_TENANT)"
        )
        raise InvalidInput(f"n is {n}; this server gives at most {bound} choices a request ({why})", param="n")


def _check_logit_bias(tokenizer: Any, logit_bias: dict[int, float]) -> None:
    size = len(tokenizer)
    outside = sorted(token for token in logit_bias if token >= size)
    if outside:
        raise InvalidInput(
            f"logit_bias: token id {outside[0]} is not in the model's vocabulary (ids 0 to {size - 1})",
            param="logit_bias",
        )


def _grammar(tokenizer: Any, record: ModelRecord, json_format: JsonFormat) -> Grammar:
    """The compiled grammar (cached), or a 422 naming the schema's field and what of it cannot be compiled."""
    try:
        return GRAMMARS.json(
            tokenizer, tokenizer_key=(record.id, record.revision), schema=json_format.schema, name=json_format.name
        )
    except GrammarError as exc:
        raise InvalidInput(
            f"{json_format.param}: not supported for structured outputs: {exc}",
            param=json_format.param,
            code=ErrorCode.unsupported_schema,
        ) from None


def _resolve(
    session: Session,
    settings: Settings,
    *,
    tenant_id: str,
    adapter_id: str | None,
    base_model: str | None,
    param: str,
) -> tuple[ModelRecord, AdapterRef | None, int]:
    """The base model, the adapter (tenant-scoped) and the positions its method puts before the prompt."""
    if adapter_id is None:
        model_id = base_model or settings.default_base_model
        record = require_model(session, model_id=model_id, param="model" if param == "model" else "base_model")
        return record, None, 0
    if adapter_id.startswith(TINKER_PATH):
        return _resolve_tinker(session, tenant_id=tenant_id, path=adapter_id, base_model=base_model, param=param)
    adapter = get_servable(session, tenant_id=tenant_id, adapter_id=adapter_id, param=param)
    if base_model is not None and base_model != adapter.base_model:
        raise InvalidInput(
            f"adapter {adapter.id} was trained on {adapter.base_model}, not {base_model}", param="base_model"
        )
    found = find_model(session, adapter.base_model)
    if found is None:
        raise adapter_unavailable(adapter.id, f"its base model {adapter.base_model} is no longer registered", param)
    if adapter.base_model_revision not in (None, found.revision):
        raise adapter_unavailable(
            adapter.id,
            f"its base model {adapter.base_model} was registered again with other files; train it again",
            param,
        )
    virtual_tokens = 0
    job = session.get(Job, adapter.job_id) if adapter.job_id is not None else None
    if job is not None:  # what the trained method puts before the prompt (its hyperparameters, as it trained)
        trained = stored_hyperparameters(adapter.method, job.hyperparameters)
        virtual_tokens = trained.reserved_positions()
    ref = AdapterRef(id=adapter.id, storage_key=adapter.storage_key, sha256=adapter.sha256, method=adapter.method)
    return found, ref, virtual_tokens


def _resolve_tinker(
    session: Session, *, tenant_id: str, path: str, base_model: str | None, param: str
) -> tuple[ModelRecord, AdapterRef | None, int]:
    """Weights a Tinker run saved (`tinker://<run>/sampler_weights/<name>` or `/weights/<name>`): a LoRA on the
    run's base model, served as any adapter."""
    found = find_saved(session, tenant_id=tenant_id, path=path)
    if found is None:
        raise NotFound(f"no weights saved at {path[:160]!r}", param=param)
    checkpoint, run = found
    if base_model is not None and base_model != run.base_model:
        raise InvalidInput(f"{path} was trained on {run.base_model}, not {base_model}", param="base_model")
    record = require_model(session, model_id=run.base_model, param=param)
    ref = adapter_ref(checkpoint)
    return record, ref, 0


# Whether the client that asked for a generation has gone (Starlette's `Request.is_disconnected`).
Disconnected = Callable[[], Awaitable[bool]]


def submit(
    engine: GenerationEngine,
    prepared: Prepared,
    metrics: Metrics,
    on_delta: Callable[[int, Delta], None] | None = None,
) -> list[Generation]:
    """The request's choices in the engine, all or none; `on_delta(i, delta)` streams choice i's text."""
    started = time.perf_counter()
    try:
        generations = engine.submit_all(prepared.choices(), on_delta)
    except EngineOverloaded as exc:
        raise TooManyRequests(
            f"the server is generating at capacity ({exc.waiting} requests waiting); try again shortly",
            retry_after=OVERLOADED_RETRY_AFTER,
            code=ErrorCode.engine_overloaded,
        ) from None
    except OwnerOverloaded as exc:
        more = f" and this request's {prepared.n} choices would pass it" if prepared.n > 1 else ""
        raise TooManyRequests(
            f"this tenant already has {exc.held} generation requests waiting or running, its limit "
            f"(TUNEFORGE_SERVING_MAX_REQUESTS_PER_TENANT){more}; wait for one to end",
            retry_after=OVERLOADED_RETRY_AFTER,
            code=ErrorCode.too_many_generations,
        ) from None
    except EngineClosed:
        raise ServiceUnavailable("the server is shutting down; try again shortly") from None
    for generation in generations:
        generation.future.add_done_callback(
            lambda future: _observe(metrics, future, time.perf_counter() - started, stream=on_delta is not None)
        )
    return generations


def _observe(metrics: Metrics, future: Future[GenerationResult], seconds: float, *, stream: bool) -> None:
    """The request's latency and tokens, as it ends, however it ends (whether or not anyone reads the result)."""
    if future.cancelled() or future.exception() is not None:
        reason = "cancelled" if future.cancelled() else "error"
        metrics.generation_ended(
            seconds=seconds, finish_reason=reason, prompt_tokens=0, completion_tokens=0, stream=stream
        )
        return
    result = future.result()
    metrics.generation_ended(
        seconds=seconds,
        finish_reason=result.finish_reason,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        stream=stream,
    )


def outcome(prepared: Prepared, future: Future[GenerationResult]) -> GenerationResult:
    """The finished request's result, or the error a client should see."""
    try:
        return future.result()
    except AdapterUnavailable as exc:
        raise adapter_unavailable(exc.adapter_id, exc.reason) from None
    except ModelUnavailable as exc:
        raise model_unavailable(prepared.base_model, exc) from None
    except GrammarFailed as exc:  # a grammar past llguidance's limits on work per token
        raise InvalidInput(f"{exc}: use a simpler schema", param="response_format") from None
    except EngineClosed:
        raise ServiceUnavailable("the server shut down before the text was finished; try again") from None


async def _watch(disconnected: Disconnected, generations: list[Generation]) -> None:
    """Cancel the generations (freeing their rows of the batch) as soon as the client disconnects."""
    while not all(generation.future.done() for generation in generations):
        if await disconnected():
            _cancel(generations)
            return
        await asyncio.sleep(DISCONNECT_POLL_SECONDS)


def _cancel(generations: list[Generation]) -> None:
    for generation in generations:
        generation.cancel()


@contextlib.asynccontextmanager
async def cancelled_on_disconnect(disconnected: Disconnected, generations: list[Generation]) -> AsyncIterator[None]:
    watcher = asyncio.create_task(_watch(disconnected, generations))
    try:
        yield
    except BaseException:
        _cancel(generations)
        raise
    finally:
        watcher.cancel()


async def complete(
    engine: GenerationEngine, prepared: Prepared, metrics: Metrics, disconnected: Disconnected
) -> list[GenerationResult]:
    """Each choice's result, in order; if one fails, the others are cancelled and its error raised."""
    generations = submit(engine, prepared, metrics)
    async with cancelled_on_disconnect(disconnected, generations):
        futures = [asyncio.wrap_future(generation.future) for generation in generations]
        await asyncio.wait(futures, return_when=asyncio.FIRST_EXCEPTION)
        for generation in generations:
            if generation.future.done() and generation.future.exception() is not None:
                _cancel(generations)  # the others, still running: nobody will read them
                outcome(prepared, generation.future)  # raises its error
        return [outcome(prepared, generation.future) for generation in generations]


class Stream:
    """A streamed generation of one or more choices: `first()` waits for the first text (so that an error before
    it is still an HTTP error status), then iterate for the rest: `(index, delta)` pairs, the choices' pieces as
    they come, then the list of their results. From its start to its end, a client that disconnects cancels it,
    whether or not the response has begun; a choice that fails ends it with that error."""

    def __init__(
        self, engine: GenerationEngine, prepared: Prepared, metrics: Metrics, disconnected: Disconnected
    ) -> None:
        loop = asyncio.get_running_loop()
        self._items: asyncio.Queue[tuple[int, Delta | Future[GenerationResult]]] = asyncio.Queue()

        def put(index: int, item: Delta | Future[GenerationResult]) -> None:
            loop.call_soon_threadsafe(self._items.put_nowait, (index, item))

        self.prepared = prepared
        self.generations = submit(engine, prepared, metrics, on_delta=put)
        for index, generation in enumerate(self.generations):
            generation.future.add_done_callback(partial(put, index))
        self._pending = len(self.generations)
        self._watcher = asyncio.create_task(_watch(disconnected, self.generations))
        self._first: tuple[int, Delta] | list[GenerationResult] | None = None

    async def first(self) -> None:
        try:
            self._first = await self._next()
        except BaseException:
            _cancel(self.generations)
            raise

    async def _next(self) -> tuple[int, Delta] | list[GenerationResult]:
        while True:
            index, item = await self._items.get()
            if not isinstance(item, Future):
                return index, item
            outcome(self.prepared, item)  # a failed choice ends the stream with its error
            self._pending -= 1
            if not self._pending:
                return [outcome(self.prepared, generation.future) for generation in self.generations]

    async def __aiter__(self) -> AsyncIterator[tuple[int, Delta] | list[GenerationResult]]:
        try:
            item = self._first if self._first is not None else await self._next()
            while True:
                yield item
                if isinstance(item, list):
                    return
                item = await self._next()
        finally:
            _cancel(self.generations)  # the client went away mid-stream (nothing to do when it finished)
            self._watcher.cancel()
