"""HTTP routes of OpenAI's inference API (`/v1/completions`, `/v1/chat/completions`), over `/generate`'s service."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.sse import EventSourceResponse

from app.core.deps import MetricsDep, SettingsDep, TenantDep, TenantThreadsDep
from app.core.metrics import Metrics
from app.inference import service
from app.inference.engine import EngineDep
from app.inference.routing import ERROR_RESPONSES, STREAM_RESPONSE, Chunk, json_format, stream_response
from app.inference.schemas import ResponseFormat, Usage, logit_bias_ids
from app.ml.serving import Delta, GenerationEngine, GenerationResult, TokenLogprob
from app.ml.tool_calls import StreamedCalls, parse_tool_calls
from app.models.deps import ModelStoreDep
from app.openai.inference_schemas import (
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
    ToolCall,
    TopLogprob,
)

router = APIRouter(tags=["generation"], responses=ERROR_RESPONSES)


def _sampling(
    body: CompletionRequest | ChatCompletionRequest,
    max_tokens: int | None,
    logprobs: int | None,
    response_format: ResponseFormat | None = None,
) -> service.Sampling:
    return service.Sampling(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=body.stop or [],
        logprobs=logprobs,
        n=body.n,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logit_bias=logit_bias_ids(body.logit_bias),
        json=json_format(response_format),
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
    threads: TenantThreadsDep,
) -> Any:
    """OpenAI's completions: `model` is a base model id, or an adapter's id or name."""
    assert isinstance(body.prompt, str)
    prepared = await threads.run(
        tenant.id,
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
        results = await service.complete(engine, prepared, metrics, http.is_disconnected)
        choices = [
            CompletionChoice(
                index=i,
                text=result.text,
                logprobs=_completion_logprobs(result.logprobs),
                finish_reason=result.finish_reason,
            )
            for i, result in enumerate(results)
        ]
        usage = Usage.of_choices(results)
        return Completion(id=ident, created=created, model=body.model, choices=choices, usage=usage)

    head = {"id": ident, "object": "text_completion", "created": created, "model": body.model}
    sent = [0] * body.n  # characters of each choice's text sent so far

    def text_choice(index: int, delta: Delta) -> list[dict[str, Any]]:
        logprobs = _completion_logprobs(delta.logprobs, sent[index])
        sent[index] += len(delta.text)
        return [
            {"text": delta.text, "logprobs": logprobs and logprobs.model_dump(), "finish_reason": delta.finish_reason}
        ]

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
    threads: TenantThreadsDep,
) -> Any:
    """OpenAI's chat completions: `model` is a base model id, or an adapter's id or name; the messages go through
    the base model's chat template, as in training."""
    top = (body.top_logprobs or 0) if body.logprobs else None
    prepared = await threads.run(
        tenant.id,
        service.prepare,
        settings,
        models,
        tenant_id=tenant.id,
        adapter_id=None,
        base_model=None,
        prompt=None,
        messages=body.chat(),
        sampling=_sampling(body, body.max_completion_tokens or body.max_tokens, top, body.response_format),
        model=body.model,
        tools=body.tool_use(),
    )
    calls_in = prepared.tool_call_format  # the answers are read as tool calls in this format (None: text)
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if not body.stream:
        results = await service.complete(engine, prepared, metrics, http.is_disconnected)
        choices = [_chat_choice(i, result, calls_in) for i, result in enumerate(results)]
        usage = Usage.of_choices(results)
        return ChatCompletion(id=ident, created=created, model=body.model, choices=choices, usage=usage)

    head = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": body.model}
    started = [False] * body.n  # whether each choice's first chunk was sent (it carries the role)
    splits = [StreamedCalls(calls_in) for _ in range(body.n)] if calls_in is not None else None

    def chat_choice(index: int, delta: Delta) -> list[dict[str, Any]]:
        text, finish = delta.text, delta.finish_reason
        calls: list[dict[str, Any]] = []
        if splits is not None:  # text that may be a call is held back; the calls come when the answer ends
            text = splits[index].feed(delta.text)
            if finish is not None:
                rest, calls = splits[index].finish()
                text += rest
        content: dict[str, Any] = {} if started[index] else {"role": "assistant", "refusal": None}
        started[index] = True
        if text or (finish is None and splits is None):
            content["content"] = text
        logprobs = _chat_logprobs(delta.logprobs)
        piece = {"delta": content, "logprobs": logprobs and logprobs.model_dump()}
        if not calls:
            return [{**piece, "finish_reason": finish}] if content or logprobs or finish else []
        # As OpenAI streams calls: each call's id and name first (arguments ""), then its arguments; the finish last.
        pieces = [{**piece, "finish_reason": None}] if content or logprobs else []
        for k, call in enumerate(calls):
            named = {**call, "function": {"name": call["function"]["name"], "arguments": ""}}
            pieces.append({"delta": {"tool_calls": [{"index": k, **named}]}, "logprobs": None, "finish_reason": None})
            arguments = {"index": k, "function": {"arguments": call["function"]["arguments"]}}
            pieces.append({"delta": {"tool_calls": [arguments]}, "logprobs": None, "finish_reason": None})
        return [*pieces, {"delta": {}, "logprobs": None, "finish_reason": "tool_calls"}]

    return await _openai_stream(engine, prepared, metrics, http, body, head, chat_choice)


def _chat_choice(index: int, result: GenerationResult, calls_in: str | None) -> ChatChoice:
    """A whole answer as OpenAI's choice: its text, or (read as calls in `calls_in`'s format) the calls it makes and
    the text before them, `finish_reason` "tool_calls"."""
    parsed = parse_tool_calls(calls_in, result.text) if calls_in is not None else None
    if parsed is None or not parsed.tool_calls:
        message = AssistantMessage(content=result.text)
        finish_reason = result.finish_reason
    else:
        message = AssistantMessage(
            content=parsed.content, tool_calls=[ToolCall.model_validate(call) for call in parsed.tool_calls]
        )
        finish_reason = "tool_calls"
    return ChatChoice(
        index=index, message=message, logprobs=_chat_logprobs(result.logprobs), finish_reason=finish_reason
    )


async def _openai_stream(
    engine: GenerationEngine,
    prepared: service.Prepared,
    metrics: Metrics,
    http: Request,
    body: CompletionRequest | ChatCompletionRequest,
    head: dict[str, Any],
    choice: Chunk,
) -> EventSourceResponse:
    """OpenAI's chunks: `head` (id, object, created, model) with one choice, each of the pieces `choice(index,
    delta)` makes of choice `index` (with their `finish_reason`; the choices' pieces interleave as they come); with
    `stream_options.include_usage`, a last chunk with no choices and the usage of them all."""

    def chunk(index: int, delta: Delta) -> list[dict[str, Any]]:
        return [{**head, "choices": [{"index": index, **piece}]} for piece in choice(index, delta)]

    def last(results: list[GenerationResult]) -> dict[str, Any] | None:
        if body.stream_options is None or not body.stream_options.include_usage:
            return None
        return {**head, "choices": [], "usage": Usage.of_choices(results).model_dump()}

    return await stream_response(engine, prepared, metrics, http, chunk, last)
