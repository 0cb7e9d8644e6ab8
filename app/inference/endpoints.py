"""HTTP route for native text generation, `/generate` (OpenAI's inference routes: app/openai/inference.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from app.core.deps import MetricsDep, SettingsDep, TenantDep, TenantThreadsDep
from app.inference import service
from app.inference.engine import EngineDep
from app.inference.routing import ERROR_RESPONSES, STREAM_RESPONSE, json_format, stream_response
from app.inference.schemas import GenerateRequest, GenerateResponse, Usage, logit_bias_ids
from app.ml.serving import Delta, GenerationResult
from app.models.deps import ModelStoreDep

router = APIRouter(tags=["generation"], responses=ERROR_RESPONSES)


@router.post("/generate", response_model=GenerateResponse, responses=STREAM_RESPONSE)
async def generate(
    body: GenerateRequest,
    http: Request,
    settings: SettingsDep,
    models: ModelStoreDep,
    engine: EngineDep,
    metrics: MetricsDep,
    tenant: TenantDep,
    threads: TenantThreadsDep,
) -> Any:
    """Text from a base model, or a base model plus an adapter. With `stream: true`, server-sent events: one
    `generation.chunk` object per piece of text, the last with `finish_reason` and `usage`, then `[DONE]`."""
    prepared = await threads.run(
        tenant.id,
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
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            logit_bias=logit_bias_ids(body.logit_bias),
            json=json_format(body.response_format),
        ),
    )

    def response(result: GenerationResult) -> GenerateResponse:
        return GenerateResponse(
            text=result.text,
            adapter_id=prepared.adapter_id,
            base_model=prepared.base_model,
            finish_reason=result.finish_reason,
            usage=Usage.of(result),
        )

    if not body.stream:
        [result] = await service.complete(engine, prepared, metrics, http.is_disconnected)
        return response(result)

    def chunk(_: int, delta: Delta) -> list[dict[str, Any]]:
        return [{"object": "generation.chunk", "text": delta.text, "finish_reason": delta.finish_reason}]

    def last(results: list[GenerationResult]) -> dict[str, Any]:
        usage = Usage.of(results[0]).model_dump()
        return {"object": "generation.chunk", "text": "", "finish_reason": None, "usage": usage}

    return await stream_response(engine, prepared, metrics, http, chunk, last)
