"""HTTP routes for text generation: native `/generate`, and OpenAI's `/v1/completions` and `/v1/chat/completions`
(streaming as server-sent events too), all on the one serving engine."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.core.deps import MetricsDep, SettingsDep, TenantDep
from app.core.errors import AppError, ErrorCode, ServiceUnavailable, error_responses
from app.inference import service
from app.inference.engine import EngineDep
from app.inference.openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ContentLogprob,
    TopLogprob,
)
from app.inference.schemas import GenerateRequest, GenerateResponse, Usage
from app.ml.serving import Delta, GenerationResult, TokenLogprob
from app.models.deps import ModelStoreDep

log = logging.getLogger(__name__)

router = APIRouter(tags=["generation"], responses=error_responses(401, 404, 410, 413, 422, 429, 503))

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream
STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or with `stream: true` server-sent events"}
}


def _usage(result: GenerationResult) -> Usage:
    return Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
    )


def _event(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _events(stream: service.Stream, chunk: Any, last: Any = None) -> AsyncIterator[str]:
    """Server-sent events: `chunk(delta)` for each delta, `last(result)` (if given) at the end, then `[DONE]`; an
    error after the stream began is sent as an event in OpenAI's error shape."""
    try:
        async for item in stream:
            if isinstance(item, Delta):
                yield _event(chunk(item))
            elif last is not None and (final := last(item)) is not None:
                yield _event(final)
    except AppError as exc:  # OpenAI's shape: the client raises it as an APIError
        yield _event(exc.body())
    except Exception:  # a failure inside the engine: said without internals (the server's log has them)
        log.exception("a streamed generation failed")
        yield _event(
            ServiceUnavailable("the text could not be finished; try again", code=ErrorCode.server_error).body()
        )
    yield _event("[DONE]")


async def _start(engine: Any, prepared: service.Prepared, metrics: Any, http: Request) -> service.Stream:
    stream = service.Stream(engine, prepared, metrics, http.is_disconnected)
    await stream.first()  # an error before the first text is still an HTTP error status
    return stream


# --- native ----------------------------------------------------------------------------------------------------
@router.post("/generate", response_model=GenerateResponse, responses=STREAM_RESPONSE)
async def generate(
    body: GenerateRequest,
    http: Request,
    settings: SettingsDep,
    models: ModelStoreDep,
    engine: EngineDep,
    metrics: MetricsDep,
    tenant: TenantDep,
) -> Any:
    """Text from a base model, or a base model plus an adapter. With `stream: true`, server-sent events: one
    `generation.chunk` object per piece of text, the last with `finish_reason` and `usage`, then `[DONE]`."""
    prepared = await run_in_threadpool(
        service.prepare,
        settings,
        models,
        tenant_id=tenant.id,
        adapter_id=body.adapter_id,
        base_model=body.base_model,
        prompt=body.prompt,
        messages=[m.model_dump() for m in body.messages] if body.messages is not None else None,
        sampling=service.Sampling(
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop=body.stop or [],
        ),
    )

    def response(result: GenerationResult) -> GenerateResponse:
        return GenerateResponse(
            text=result.text,
            adapter_id=prepared.adapter_id,
            base_model=prepared.base_model,
            finish_reason=result.finish_reason,
            usage=_usage(result),
        )

    if not body.stream:
        return response(await service.complete(engine, prepared, metrics, http.is_disconnected))

    def chunk(delta: Delta) -> dict[str, Any]:
        return {"object": "generation.chunk", "text": delta.text, "finish_reason": delta.finish_reason}

    def last(result: GenerationResult) -> dict[str, Any]:
        return {"object": "generation.chunk", "text": "", "finish_reason": None, "usage": _usage(result).model_dump()}

    stream = await _start(engine, prepared, metrics, http)
    return StreamingResponse(_events(stream, chunk, last), media_type="text/event-stream", headers=SSE_HEADERS)


# --- OpenAI-compatible -----------------------------------------------------------------------------------------
def _sampling(body: CompletionRequest | ChatCompletionRequest, max_tokens: int | None, logprobs: int | None) -> Any:
    return service.Sampling(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=body.stop or [],
        logprobs=logprobs,
    )


def _completion_logprobs(items: list[TokenLogprob] | None, offset: int = 0) -> CompletionLogprobs | None:
    if items is None:
        return None
    offsets, at = [], offset
    for item in items:
        offsets.append(at)
        at += len(item.token)
    return CompletionLogprobs(
        tokens=[i.token for i in items],
        token_logprobs=[i.logprob for i in items],
        top_logprobs=[{token: lp for token, _, lp in i.top} for i in items],
        text_offset=offsets,
    )


def _chat_logprobs(items: list[TokenLogprob] | None) -> ChoiceLogprobs | None:
    if items is None:
        return None
    return ChoiceLogprobs(
        content=[
            ContentLogprob(
                token=i.token,
                logprob=i.logprob,
                bytes=list(i.token.encode()),
                top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=list(t.encode())) for t, _, lp in i.top],
            )
            for i in items
        ]
    )


@router.post("/v1/completions", response_model=Completion, responses=STREAM_RESPONSE)
async def create_completion(
    body: CompletionRequest,
    http: Request,
    settings: SettingsDep,
    models: ModelStoreDep,
    engine: EngineDep,
    metrics: MetricsDep,
    tenant: TenantDep,
) -> Any:
    """OpenAI's completions: `model` is a base model id, or an adapter's id or name."""
    assert isinstance(body.prompt, str)
    prepared = await run_in_threadpool(
        service.prepare,
        settings,
        models,
        tenant_id=tenant.id,
        adapter_id=None,
        base_model=None,
        prompt=body.prompt,
        messages=None,
        sampling=_sampling(body, body.max_tokens, body.logprobs),
        model=body.model,
    )
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if not body.stream:
        result = await service.complete(engine, prepared, metrics, http.is_disconnected)
        choice = CompletionChoice(
            text=result.text, logprobs=_completion_logprobs(result.logprobs), finish_reason=result.finish_reason
        )
        return Completion(id=ident, created=created, model=body.model, choices=[choice], usage=_usage(result))

    head = {"id": ident, "object": "text_completion", "created": created, "model": body.model}
    sent = 0

    def text_choice(delta: Delta) -> dict[str, Any]:
        nonlocal sent
        logprobs = _completion_logprobs(delta.logprobs, sent)
        sent += len(delta.text)
        return {"text": delta.text, "logprobs": logprobs and logprobs.model_dump()}

    return await _openai_stream(engine, prepared, metrics, http, body, head, text_choice)


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=STREAM_RESPONSE)
async def create_chat_completion(
    body: ChatCompletionRequest,
    http: Request,
    settings: SettingsDep,
    models: ModelStoreDep,
    engine: EngineDep,
    metrics: MetricsDep,
    tenant: TenantDep,
) -> Any:
    """OpenAI's chat completions: `model` is a base model id, or an adapter's id or name; the messages go through
    the base model's chat template, as in training."""
    top = (body.top_logprobs or 0) if body.logprobs else None
    prepared = await run_in_threadpool(
        service.prepare,
        settings,
        models,
        tenant_id=tenant.id,
        adapter_id=None,
        base_model=None,
        prompt=None,
        messages=body.chat(),
        sampling=_sampling(body, body.max_completion_tokens or body.max_tokens, top),
        model=body.model,
    )
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if not body.stream:
        result = await service.complete(engine, prepared, metrics, http.is_disconnected)
        choice = ChatChoice(
            message=AssistantMessage(content=result.text),
            logprobs=_chat_logprobs(result.logprobs),
            finish_reason=result.finish_reason,
        )
        return ChatCompletion(id=ident, created=created, model=body.model, choices=[choice], usage=_usage(result))

    head = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": body.model}
    first = True

    def chat_choice(delta: Delta) -> dict[str, Any]:
        nonlocal first
        content: dict[str, Any] = {"role": "assistant"} if first else {}
        first = False
        if delta.text or delta.finish_reason is None:
            content["content"] = delta.text
        logprobs = _chat_logprobs(delta.logprobs)
        return {"delta": content, "logprobs": logprobs and logprobs.model_dump()}

    return await _openai_stream(engine, prepared, metrics, http, body, head, chat_choice)


async def _openai_stream(
    engine: Any,
    prepared: service.Prepared,
    metrics: Any,
    http: Request,
    body: CompletionRequest | ChatCompletionRequest,
    head: dict[str, Any],
    choice: Callable[[Delta], dict[str, Any]],
) -> StreamingResponse:
    """OpenAI's chunks: `head` (id, object, created, model) with the one choice `choice(delta)` makes and its
    `finish_reason`; with `stream_options.include_usage`, a last chunk with no choices and the usage."""

    def chunk(delta: Delta) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, **choice(delta), "finish_reason": delta.finish_reason}]}

    def last(result: GenerationResult) -> dict[str, Any] | None:
        if body.stream_options is None or not body.stream_options.include_usage:
            return None
        return {**head, "choices": [], "usage": _usage(result).model_dump()}

    stream = await _start(engine, prepared, metrics, http)
    return StreamingResponse(_events(stream, chunk, last), media_type="text/event-stream", headers=SSE_HEADERS)
