"""Resolve the adapter (tenant-scoped), tokenize the prompt, hand the request to the serving engine."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.adapters.service import adapter_unavailable, get_servable
from app.base_models.service import load_tokenizer, model_unavailable, require_model
from app.core.errors import InvalidInput
from app.core.models import Job
from app.core.settings import Settings
from app.generation.schemas import GenerateRequest, GenerateResponse, Usage
from app.ml.formatting import encode_chat_prompt, encode_prompt
from app.ml.methods import METHODS
from app.ml.registry import ModelStore, ModelUnavailable, find_model
from app.ml.serving import AdapterRef, AdapterUnavailable, GenerationEngine, GenerationRequest


def generate(
    session: Session,
    *,
    settings: Settings,
    models: ModelStore,
    engine: GenerationEngine,
    tenant_id: str,
    request: GenerateRequest,
) -> GenerateResponse:
    adapter_ref = None
    virtual_tokens = 0  # positions a prompt-learning adapter takes before the prompt
    if request.adapter_id is not None:
        adapter = get_servable(session, tenant_id=tenant_id, adapter_id=request.adapter_id)
        if request.base_model is not None and request.base_model != adapter.base_model:
            raise InvalidInput(
                f"adapter {adapter.id} was trained on {adapter.base_model}, not {request.base_model}",
                param="base_model",
            )
        base_model = adapter.base_model
        found = find_model(session, base_model)
        if found is None:
            raise adapter_unavailable(adapter.id, f"its base model {base_model} is no longer registered")
        if adapter.base_model_revision not in (None, found.revision):
            raise adapter_unavailable(
                adapter.id, f"its base model {base_model} was registered again with other files; train it again"
            )
        record = found
        job = session.get(Job, adapter.job_id)
        if job is not None:  # what the trained method puts before the prompt (its hyperparameters, as it trained)
            trained = METHODS[adapter.method].hyperparameters.model_validate(job.hyperparameters)
            virtual_tokens = trained.reserved_positions()
        adapter_ref = AdapterRef(
            id=adapter.id, storage_key=adapter.storage_key, sha256=adapter.sha256, method=adapter.method
        )
    else:
        base_model = request.base_model or settings.default_base_model
        record = require_model(session, model_id=base_model)
    tokenizer = load_tokenizer(models, record)
    if request.messages is not None:
        if tokenizer.chat_template is None:
            raise InvalidInput(
                f"{base_model} has no chat template: send `prompt` instead of `messages`",
                param="messages",
                code="no_chat_template",
            )
        input_ids = encode_chat_prompt(tokenizer, [m.model_dump() for m in request.messages])
    else:
        input_ids = encode_prompt(tokenizer, request.prompt or "")
    if not input_ids:
        raise InvalidInput("prompt is empty", param="prompt")
    limit = record.max_seq_length - virtual_tokens
    if len(input_ids) + request.max_tokens > limit:
        room = str(limit)
        if virtual_tokens:
            room += f" ({base_model} takes {record.max_seq_length}, less the adapter's {virtual_tokens} virtual tokens)"
        raise InvalidInput(
            f"prompt ({len(input_ids)} tokens) plus max_tokens ({request.max_tokens}) exceeds {room}",
            param="max_tokens",
        )
    try:
        result = engine.generate(
            GenerationRequest(
                model=record,
                adapter=adapter_ref,
                input_ids=input_ids,
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                seed=request.seed,
                stop=request.stop or [],
            )
        )
    except AdapterUnavailable as exc:
        raise adapter_unavailable(exc.adapter_id, exc.reason) from None
    except ModelUnavailable as exc:
        raise model_unavailable(base_model, exc) from None
    return GenerateResponse(
        text=result.text,
        adapter_id=request.adapter_id,
        base_model=base_model,
        finish_reason=result.finish_reason,
        usage=Usage(
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            total_tokens=result.prompt_tokens + result.completion_tokens,
        ),
    )
