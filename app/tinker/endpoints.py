"""HTTP routes of Tinker's protocol (`/api/v1/…`), as the official `tinker` client calls them: its handshake,
sessions and heartbeats, server capabilities, LoRA training runs (`create_model`, `get_info`, `forward_backward`
in protobuf, `optim_step`) and the futures it polls (`retrieve_future`). docs/design/tinker-protocol.md has the
protocol; the client authenticates with `X-API-Key: tml-<Tuneforge key>` (app/core/middleware.py).

Request bodies ignore fields they do not know: the client adds some (`type`, `sdk_version`, …) and newer ones more.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import tempfile
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path as Path_
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Body, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import func, select

from app.core.deps import SessionDep, SettingsDep, TenantDep
from app.core.errors import AppError, ErrorCode, Gone, InvalidInput, NotFound, TooManyRequests, error_responses
from app.core.models import TinkerCheckpoint, TinkerRun
from app.core.settings import Settings
from app.core.storage import delete_after_commit
from app.inference.engine import EngineDep
from app.inference.schemas import MAX_NEW_TOKENS, MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_TOP_K
from app.inference.service import DEFAULT_MAX_TOKENS, choice_seed
from app.ml import adapter_format
from app.ml.serving import (
    AdapterRef,
    AdapterUnavailable,
    EngineOverloaded,
    GenerationRequest,
    GenerationResult,
    OwnerOverloaded,
)
from app.ml.training.stepwise import LOSSES, Example, LoraRun
from app.models.service import list_models, load_tokenizer, require_model
from app.tinker import wire
from app.tinker.repository import delete_saved, expiry, find_saved
from app.tinker.service import TinkerService, UserError, fetched


class InTurnRoute(APIRoute):
    """A route whose refused requests still take their turn in their run (`TinkerService.skip`): whatever refuses
    a request that names a run and a seq_id — its body's validation, a bound, a check of the handler — the run's
    later requests go on."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def in_turn(request: Request) -> Response:
            try:
                return await handler(request)
            except (AppError, RequestValidationError):
                turn = await _turn(request)
                tenant = request.scope.get("state", {}).get("tenant")
                if turn is not None and tenant is not None:
                    tinker(request).skip(tenant.id, *turn)
                raise

        return in_turn


async def _turn(request: Request) -> tuple[str, int] | None:
    """The run and seq_id a request names, if it names both (JSON, or a protobuf pass)."""
    body = await request.body()
    if request.headers.get("content-type", "").startswith(PROTOBUF):
        try:
            message = wire.ForwardBackwardRequest.FromString(body)
        except Exception:  # not even a pass: it names no run
            return None
        return (message.model_id, message.seq_id) if message.model_id else None
    try:
        fields = json.loads(body)
    except ValueError:
        return None
    if not isinstance(fields, dict):
        return None
    model_id, seq_id = fields.get("model_id"), fields.get("seq_id")
    if isinstance(model_id, str) and isinstance(seq_id, int) and not isinstance(seq_id, bool):
        return model_id, seq_id
    return None


router = APIRouter(
    prefix="/api/v1",
    tags=["tinker"],
    responses=error_responses(401, 404, 409, 410, 422),
    route_class=InTurnRoute,
)
PROTOBUF = "application/x-protobuf"
MAX_PROMPT_TOKENS = 131_072  # a sampling prompt's tokens (bounded again by the model's context)
MAX_SAMPLES = 16  # samples of one asample request


MAX_FIELDS = 32  # fields of one body, known or not
MAX_FIELD_NAME = 64


def _open_to_unknown_fields(schema: dict[str, Any]) -> None:
    schema["additionalProperties"] = {"description": "ignored"}
    schema["maxProperties"] = MAX_FIELDS
    schema["propertyNames"] = {"maxLength": MAX_FIELD_NAME}


class _Body(BaseModel):
    """A body of the client's: fields this server does not read are ignored (the client sends some, `type` and
    `sdk_version` among them, and newer clients more), within bounds on their number and names."""

    model_config = ConfigDict(extra="ignore", json_schema_extra=_open_to_unknown_fields)

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, value: Any) -> Any:
        if isinstance(value, dict):
            if len(value) > MAX_FIELDS:
                raise ValueError(f"{len(value)} fields; at most {MAX_FIELDS}")
            if any(len(str(key)) > MAX_FIELD_NAME for key in value):
                raise ValueError(f"a field name longer than {MAX_FIELD_NAME} characters")
        return value


class SessionRef(_Body):
    session_id: str = Field(max_length=64)


class LoraSpec(_Body):
    rank: int = Field(32, ge=1, le=256)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True


class CreateModel(_Body):
    session_id: str = Field(max_length=64)
    model_seq_id: int = Field(ge=0, le=1_000_000)
    base_model: str = Field(max_length=200)
    lora_config: LoraSpec = Field(default_factory=lambda: LoraSpec.model_validate({}))


class ModelRef(_Body):
    model_id: str = Field(max_length=128)


class AdamParams(_Body):
    learning_rate: float = Field(1e-4, ge=0, le=10)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-12, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0, le=10)
    grad_clip_norm: float = Field(0.0, ge=0, le=1e6)


class OptimStep(_Body):
    model_id: str = Field(max_length=128)
    seq_id: int = Field(ge=1, le=2**31 - 1)
    adam_params: AdamParams


Name = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^/]+$")]


MAX_TTL_SECONDS = 10 * 365 * 86400
MAX_TOP_K_PROMPT_LOGPROBS = 20  # as OpenAI's top_logprobs
TtlSeconds = Annotated[
    int | None, Field(None, ge=1, le=MAX_TTL_SECONDS, description="Deleted this long after saving (none: kept)")
]


class SaveForSampler(_Body):
    model_id: str = Field(max_length=128)
    seq_id: int = Field(ge=1, le=2**31 - 1)
    path: Name | None = Field(None, description="A name (`save_weights_for_sampler(name)`)")
    ttl_seconds: TtlSeconds = None
    sampling_session_seq_id: int | None = Field(None, ge=0, le=1_000_000)


class CreateSamplingSession(_Body):
    session_id: str = Field(max_length=64)
    sampling_session_seq_id: int = Field(ge=0, le=1_000_000)
    model_path: str | None = Field(None, max_length=400)
    base_model: str | None = Field(None, max_length=200)


class TextChunk(_Body):
    type: Literal["encoded_text"] = "encoded_text"
    tokens: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] = Field(max_length=MAX_PROMPT_TOKENS)


class PromptInput(_Body):
    chunks: list[TextChunk] = Field(min_length=1, max_length=64)


class SamplingParams(_Body):
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    seed: int | None = Field(None, ge=0, le=2**64 - 1)
    stop: (
        Annotated[str, Field(max_length=MAX_STOP_CHARS)]
        | Annotated[
            list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOP_STRINGS)
        ]
        | Annotated[list[Annotated[int, Field(ge=0, le=2**31 - 1)]], Field(max_length=MAX_STOP_STRINGS)]
        | None
    ) = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_k: int = Field(-1, ge=-1, le=MAX_TOP_K)
    top_p: float = Field(1.0, gt=0, le=1)


class ASample(_Body):
    sampling_session_id: str = Field(max_length=128)
    seq_id: int = Field(0, ge=0, le=2**63 - 1)
    num_samples: int = Field(1, ge=1, le=MAX_SAMPLES)
    prompt: PromptInput
    sampling_params: SamplingParams = Field(default_factory=lambda: SamplingParams.model_validate({}))
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = Field(
        0, ge=0, le=MAX_TOP_K_PROMPT_LOGPROBS, description="The k likeliest tokens at each prompt position"
    )
    topk_sample_logprobs: int = Field(
        0, ge=0, le=0, description="Not served (0 only): the engine gives each sampled token's own log-probability"
    )


class RetrieveFuture(_Body):
    request_id: str = Field(max_length=64)


def tinker(request: Request) -> TinkerService:
    return request.app.state.tinker  # type: ignore[no-any-return]


# --- handshake, sessions, capabilities ------------------------------------------------------------------------


@router.post("/client/config")
def client_config(settings: SettingsDep, tenant: TenantDep) -> dict[str, Any]:
    """What the client is to do here: no JWT exchange, httpx as its transport, the chunks of one forward/backward
    sent in order and no larger than this server takes (a large batch is split into requests by the client)."""
    return {
        "pjwt_auth_enabled": False,
        "use_pyqwest_transport": False,
        "parallel_fwdbwd_chunks": False,
        "fwdbwd_max_chunk_len": settings.tinker_max_examples,
        # The client sizes chunks by its estimate of their bytes: 16 a token for cross_entropy (an int32 input, an
        # int64 target, a float32 weight); half the token bound leaves room for padding to the longest example.
        "fwdbwd_max_chunk_bytes_count": min(
            settings.tinker_max_request_bytes // 2, settings.tinker_max_batch_tokens * 8
        ),
        "proto_compress_fwdbwd": False,
        "custom_loss_server_side": False,
        "sample_use_retrieve_futures": False,
    }


@router.post("/client/dynamic_config")
def client_dynamic_config(tenant: TenantDep) -> dict[str, Any]:
    return {"refresh_interval_sec": 300, "sample_cancel_enabled": False}


@router.post("/telemetry")
def telemetry(tenant: TenantDep) -> dict[str, str]:
    """The client's telemetry: accepted and dropped (nothing of it is kept)."""
    return {"status": "accepted"}


@router.get("/get_server_capabilities")
def server_capabilities(session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    """The registered base models, each trainable with LoRA and sampleable here."""
    return {
        "supported_models": [
            {"model_name": m.id, "max_context_length": m.max_seq_length, "trainable": True, "sampleable": True}
            for m in list_models(session)
        ]
    }


@router.post("/create_session")
def create_session(request: Request, tenant: TenantDep) -> dict[str, Any]:
    return {"session_id": tinker(request).create_session(tenant.id), "type": "create_session"}


@router.post("/session_heartbeat")
def session_heartbeat(body: SessionRef, request: Request, tenant: TenantDep) -> dict[str, str]:
    """Keeps the session open (410 once it is closed: the client stops its heartbeats)."""
    tinker(request).heartbeat(tenant.id, body.session_id)
    return {"type": "session_heartbeat"}


@router.post("/sessions/{session_id}/finish")
def finish_session(
    session_id: Annotated[str, Path(max_length=64)], request: Request, tenant: TenantDep
) -> dict[str, str]:
    """Close the session: its training runs and their models are let go."""
    tinker(request).session(tenant.id, session_id)
    tinker(request).close_session(session_id, "finished by the client")
    return {"type": "finish_session"}


# --- training ---------------------------------------------------------------------------------------------------


@router.post("/create_model")
def create_model(body: CreateModel, request: Request, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    """A LoRA training run on a registered base model, `<session>:train:<model_seq_id>` (its model loads in the
    background: the future answers once it is there)."""
    record = require_model(session, model_id=body.base_model, param="base_model")
    session.rollback()  # no connection held while the run is set up
    lora = body.lora_config
    if not (lora.train_attn or lora.train_mlp or lora.train_unembed):
        raise InvalidInput("lora_config: train at least one of attn, mlp, unembed", param="lora_config")
    model_id, request_id = tinker(request).create_run(
        tenant.id, body.session_id, body.model_seq_id, record, lora.model_dump()
    )
    return {"request_id": request_id, "model_id": model_id}


@router.post("/get_info")
def get_info(body: ModelRef, request: Request, tenant: TenantDep) -> dict[str, Any]:
    run = tinker(request).run(tenant.id, body.model_id)
    return {
        "type": "get_info",
        "model_id": run.model_id,
        "model_data": {"arch": None, "model_name": run.base_model, "tokenizer_id": run.base_model},
        "is_lora": True,
        "lora_rank": run.rank,
        "model_name": run.base_model,
        "optimizer_config": {"type": "adamw"},
    }


@router.post(
    "/forward_backward",
    openapi_extra={"requestBody": {"content": {PROTOBUF: {"schema": {"type": "string", "format": "binary"}}}}},
)
async def forward_backward(request: Request, settings: SettingsDep, tenant: TenantDep) -> dict[str, Any]:
    """A forward (`forward_only`) or forward/backward pass, in protobuf (`tinker_public.ForwardBackwardRequest`);
    its result, in protobuf too, comes from `retrieve_future`."""
    try:
        message = wire.ForwardBackwardRequest.FromString(await request.body())
    except Exception:  # any malformed protobuf (the library's errors vary by implementation)
        raise InvalidInput("the body is not a tinker_public.ForwardBackwardRequest") from None
    examples = decode_examples(message, settings)
    loss_fn = message.loss_fn
    if loss_fn not in LOSSES:
        raise InvalidInput(f"loss_fn: {loss_fn[:40]!r} is not one of {', '.join(LOSSES)}", param="loss_fn")
    config = {k: v.number for k, v in message.loss_fn_config_v2.items() if v.HasField("number")}
    config = config or dict(message.loss_fn_config)
    service = tinker(request)
    run = service.run(tenant.id, message.model_id)
    forward_only = message.forward_only

    def work(lora: LoraRun) -> bytes:
        result = lora.forward_backward(examples, loss_fn, config, forward_only=forward_only)
        if not forward_only:
            run.metrics.observe(examples, loss_fn, result.metrics["loss:sum"])
        return encode_output(result.logprobs, result.metrics)

    kind = "Forward" if forward_only else "ForwardBackward"
    return {"request_id": service.submit(run, message.seq_id, kind, work), "model_id": run.model_id}


@router.post("/optim_step")
def optim_step(body: OptimStep, request: Request, tenant: TenantDep) -> dict[str, Any]:
    service = tinker(request)
    run = service.run(tenant.id, body.model_id)
    adam = body.adam_params.model_dump()

    def work(lora: LoraRun) -> dict[str, Any]:
        metrics = lora.optim_step(**adam)
        service.stepped(run)
        return {"metrics": metrics, "type": "optim_step"}

    return {"request_id": service.submit(run, body.seq_id, "OptimStep", work), "model_id": run.model_id}


@router.post("/save_weights_for_sampler")
def save_weights_for_sampler(
    body: SaveForSampler, request: Request, settings: SettingsDep, tenant: TenantDep
) -> dict[str, Any]:
    """The run's LoRA as it is now, stored for sampling: named (`tinker://<run>/sampler_weights/<name>`, for
    `create_sampling_client(model_path=…)`), or unnamed with a sampling session made on it at once."""
    service = tinker(request)
    run = service.run(tenant.id, body.model_id)
    storage = request.app.state.storage
    if body.path is None and body.sampling_session_seq_id is None:
        raise InvalidInput("give a path (a name) or a sampling_session_seq_id", param="path")
    name = body.path or f"sampler-{secrets.token_hex(6)}"
    path = f"tinker://{run.model_id}/sampler_weights/{name}"

    def work(lora: LoraRun) -> dict[str, Any]:
        ref, size = store_lora(settings, storage, lora, run.base_model, f"tinker/{tenant.id}/{run.model_id}/{name}")
        if body.path is not None:  # named: a checkpoint, kept beyond the session
            service.record_checkpoint(run, "sampler", name, path, ref, size, body.ttl_seconds)
        else:  # for the sampling session made here only: deleted with the session
            service.remember_saved(tenant.id, run.session_id, path, run.base_model, ref)
        result: dict[str, Any] = {"path": path, "type": "save_weights_for_sampler"}
        if body.sampling_session_seq_id is not None:
            result["sampling_session_id"] = service.create_sampler(
                tenant.id,
                run.session_id,
                body.sampling_session_seq_id,
                base_model=run.base_model,
                model_path=path,
                adapter=ref,
            )
        return result

    return {"request_id": service.submit(run, body.seq_id, "SaveWeightsForSampler", work), "model_id": run.model_id}


@router.post("/save_weights_external")
def save_weights_external(tenant: TenantDep) -> None:
    """Not served: weights are saved to this server's object store (`save_state`, `save_weights_for_sampler`)."""
    raise InvalidInput(
        "saving weights to outside storage is not served here: save_state or save_weights_for_sampler, then "
        "download the checkpoint's archive",
        param="path",
    )


class SaveState(_Body):
    model_id: str = Field(max_length=128)
    seq_id: int = Field(ge=1, le=2**31 - 1)
    path: Name
    ttl_seconds: TtlSeconds = None


class LoadState(_Body):
    path: str = Field(max_length=400)
    optimizer: bool = False
    # create_training_client_from_state[_with_optimizer]: a new run in this session...
    session_id: str | None = Field(None, max_length=64)
    model_seq_id: int | None = Field(None, ge=0, le=1_000_000)
    # ...or the older load_state: into an existing run, at its turn
    model_id: str | None = Field(None, max_length=128)
    seq_id: int | None = Field(None, ge=1, le=2**31 - 1)


@router.post("/save_weights")
def save_state(body: SaveState, request: Request, settings: SettingsDep, tenant: TenantDep) -> dict[str, Any]:
    """The run's whole state (the LoRA and AdamW's moments and step counts) as `tinker://<run>/weights/<name>`:
    a new run made from it (`create_training_client_from_state_with_optimizer`) goes on exactly as this one."""
    service = tinker(request)
    run = service.run(tenant.id, body.model_id)
    storage = request.app.state.storage
    path = f"tinker://{run.model_id}/weights/{body.path}"

    def work(lora: LoraRun) -> dict[str, Any]:
        key = f"tinker/{tenant.id}/{run.model_id}/state-{body.path}"
        ref, size = store_lora(settings, storage, lora, run.base_model, key, state=True)
        service.record_checkpoint(run, "training", body.path, path, ref, size, body.ttl_seconds)
        return {"path": path, "type": "save_weights"}

    return {"request_id": service.submit(run, body.seq_id, "SaveWeights", work), "model_id": run.model_id}


@router.post("/load_weights")
def load_state(
    body: LoadState, request: Request, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> dict[str, Any]:
    """A saved state: as a new run `<session>:train:<model_seq_id>` (the client's
    `create_training_client_from_state[_with_optimizer]`), or into an existing run at its turn (`load_state`);
    with `optimizer`, AdamW's state too."""
    service = tinker(request)
    storage = request.app.state.storage
    _, base_model, ref, lora = service.stored_weights(tenant.id, body.path, kind="training")
    optimizer = body.optimizer

    def load(target: LoraRun) -> None:
        fetch_state(settings, storage, ref, target, optimizer=optimizer)

    if body.model_id is not None and body.seq_id is not None:
        run = service.run(tenant.id, body.model_id)
        if run.base_model != base_model or run.rank != lora.get("rank"):
            raise InvalidInput(f"{body.path} was saved from a run on another model or rank", param="path")

        def work(target: LoraRun) -> dict[str, Any]:
            load(target)
            return {"path": body.path, "model_id": run.model_id, "type": "load_weights"}

        return {"request_id": service.submit(run, body.seq_id, "LoadWeights", work), "model_id": run.model_id}
    if body.session_id is None or body.model_seq_id is None:
        raise InvalidInput("give session_id and model_seq_id (a new run), or model_id and seq_id", param="session_id")
    record = require_model(session, model_id=base_model, param="path")
    session.rollback()
    model_id, request_id = service.create_run(tenant.id, body.session_id, body.model_seq_id, record, lora, start=load)
    return {"request_id": request_id, "model_id": model_id}


# --- runs and checkpoints, listed (the REST client) ----------------------------------------------------------------


def _checkpoint(row: Any) -> dict[str, Any]:
    return {
        "checkpoint_id": f"{'weights' if row.kind == 'training' else 'sampler_weights'}/{row.name}",
        "checkpoint_type": row.kind,
        "time": row.created_at.isoformat(),
        "tinker_path": row.tinker_path,
        "size_bytes": row.size_bytes,
        "public": False,
        "user_metadata": None,
        "expires_at": row.expires_at.isoformat() if row.expires_at else None,
    }


def _training_run(db: Any, run: TinkerRun) -> dict[str, Any]:
    checkpoints = db.scalars(
        select(TinkerCheckpoint).where(TinkerCheckpoint.run_id == run.id).order_by(TinkerCheckpoint.created_at.desc())
    ).all()
    latest = {kind: next((c for c in checkpoints if c.kind == kind), None) for kind in ("training", "sampler")}
    return {
        "training_run_id": run.id,
        "base_model": run.base_model,
        "model_owner": run.tenant_id,
        "is_lora": True,
        "corrupted": False,
        "lora_rank": run.lora_rank,
        "last_request_time": run.last_request_at.isoformat(),
        "last_checkpoint": _checkpoint(latest["training"]) if latest["training"] else None,
        "last_sampler_checkpoint": _checkpoint(latest["sampler"]) if latest["sampler"] else None,
        "user_metadata": None,
    }


Offset = Annotated[int, Query(ge=0, le=1_000_000)]
Limit = Annotated[int, Query(ge=1, le=1000)]
AccessScope = Annotated[Literal["owned", "accessible"], Query()]


@router.get("/training_runs")
def list_training_runs(
    session: SessionDep, tenant: TenantDep, limit: Limit = 20, offset: Offset = 0, access_scope: AccessScope = "owned"
) -> dict[str, Any]:
    """This tenant's runs, newest first (`accessible` is the same: nothing is shared)."""
    query = select(TinkerRun).where(TinkerRun.tenant_id == tenant.id)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    runs = session.scalars(query.order_by(TinkerRun.created_at.desc()).offset(offset).limit(limit)).all()
    return {
        "training_runs": [_training_run(session, run) for run in runs],
        "cursor": {"offset": offset, "limit": limit, "total_count": total},
    }


RunId = Annotated[str, Path(max_length=128)]


def _own_run(session: Any, tenant_id: str, run_id: str) -> TinkerRun:
    run = session.get(TinkerRun, run_id)
    if run is None or run.tenant_id != tenant_id:
        raise NotFound(f"no training run {run_id[:80]!r}", param="run_id")
    return run  # type: ignore[no-any-return]


@router.get("/training_runs/{run_id}")
def get_training_run(
    run_id: RunId, session: SessionDep, tenant: TenantDep, access_scope: AccessScope = "owned"
) -> dict[str, Any]:
    return _training_run(session, _own_run(session, tenant.id, run_id))


@router.get("/training_runs/{run_id}/checkpoints")
def list_run_checkpoints(run_id: RunId, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    _own_run(session, tenant.id, run_id)
    rows = session.scalars(
        select(TinkerCheckpoint).where(TinkerCheckpoint.run_id == run_id).order_by(TinkerCheckpoint.created_at.desc())
    ).all()
    return {"checkpoints": [_checkpoint(row) for row in rows], "cursor": None}


@router.get("/checkpoints")
def list_checkpoints(session: SessionDep, tenant: TenantDep, limit: Limit = 100, offset: Offset = 0) -> dict[str, Any]:
    query = select(TinkerCheckpoint).where(TinkerCheckpoint.tenant_id == tenant.id)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(TinkerCheckpoint.created_at.desc()).offset(offset).limit(limit)).all()
    return {
        "checkpoints": [_checkpoint(row) for row in rows],
        "cursor": {"offset": offset, "limit": limit, "total_count": total},
    }


CheckpointId = Annotated[str, Path(max_length=200)]


def _own_checkpoint(session: Any, tenant_id: str, run_id: str, checkpoint_id: str) -> TinkerCheckpoint:
    kind, _, name = checkpoint_id.partition("/")
    found = find_saved(session, tenant_id=tenant_id, path=f"tinker://{run_id}/{kind}/{name}")
    if found is None:
        raise NotFound(f"no checkpoint {checkpoint_id[:120]!r} of {run_id[:80]!r}", param="checkpoint_id")
    return found[0]


@router.get("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/archive")
def download_checkpoint(
    run_id: RunId, checkpoint_id: CheckpointId, request: Request, session: SessionDep, tenant: TenantDep
) -> Response:
    """The checkpoint's archive (.tar.gz: the LoRA in PEFT's format, which `PeftModel.from_pretrained` loads, and
    for a saved state AdamW's `optimizer.pt`)."""
    row = _own_checkpoint(session, tenant.id, run_id, checkpoint_id)
    key, name, size = row.storage_key, row.name, row.size_bytes
    session.rollback()
    try:
        _, chunks = request.app.state.storage.open(key)
    except FileNotFoundError:
        raise Gone("the checkpoint's stored files are missing", param="checkpoint_id") from None
    headers = {**_attachment(name), "Content-Length": str(size)}
    return StreamingResponse(chunks, media_type="application/gzip", headers=headers)


def _attachment(name: str) -> dict[str, str]:
    return {"Content-Disposition": f'attachment; filename="{name}.tar.gz"'}


class CheckpointTtl(_Body):
    ttl_seconds: TtlSeconds = None


# Declared before the deletion's route, whose `{checkpoint_id:path}` would take these paths' last part too.
@router.put("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/ttl")
def set_checkpoint_ttl(
    run_id: RunId, checkpoint_id: CheckpointId, body: CheckpointTtl, session: SessionDep, tenant: TenantDep
) -> dict[str, Any]:
    """Delete the checkpoint `ttl_seconds` from now (null: keep it)."""
    row = _own_checkpoint(session, tenant.id, run_id, checkpoint_id)
    row.expires_at = expiry(body.ttl_seconds)
    return _checkpoint(row)


@router.post("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/publish")
@router.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/publish")
def publish_checkpoint(run_id: RunId, checkpoint_id: CheckpointId, session: SessionDep, tenant: TenantDep) -> None:
    """Not served: a Tuneforge tenant's checkpoints are its own (no other tenant may load them)."""
    _own_checkpoint(session, tenant.id, run_id, checkpoint_id)
    raise InvalidInput(
        "publishing checkpoints is not served here: a tenant's checkpoints are its own; download the archive "
        "(or its adapter, GET /adapters/{id}/download) to share it",
        param="checkpoint_id",
    )


@router.get("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/external_weights_urls")
def external_weights_urls(run_id: RunId, checkpoint_id: CheckpointId, session: SessionDep, tenant: TenantDep) -> None:
    """Not served: the archive route downloads a checkpoint's files through this server."""
    _own_checkpoint(session, tenant.id, run_id, checkpoint_id)
    raise InvalidInput(
        "signed URLs of a checkpoint's files are not served here: download its archive "
        f"(GET /api/v1/training_runs/{run_id[:80]}/checkpoints/{checkpoint_id[:120]}/archive)",
        param="checkpoint_id",
    )


@router.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}")
def delete_checkpoint(
    run_id: RunId, checkpoint_id: CheckpointId, request: Request, session: SessionDep, tenant: TenantDep
) -> dict[str, Any]:
    """Delete the checkpoint: its row now, its files once that is committed."""
    row = _own_checkpoint(session, tenant.id, run_id, checkpoint_id)
    delete_saved(session, row)  # sampler weights: their adapter goes with them
    delete_after_commit(session, request.app.state.storage, [row.storage_key], what=f"tinker checkpoint {row.id}")
    return {"deleted": True}


# --- sampling ---------------------------------------------------------------------------------------------------


@router.post("/create_sampling_session")
def create_sampling_session(
    body: CreateSamplingSession, request: Request, session: SessionDep, tenant: TenantDep
) -> dict[str, Any]:
    """A sampling session on saved weights (`model_path`) or a base model alone."""
    if body.model_path is None and body.base_model is not None:
        require_model(session, model_id=body.base_model, param="base_model")
    sampler_id = tinker(request).create_sampler(
        tenant.id,
        body.session_id,
        body.sampling_session_seq_id,
        base_model=body.base_model,
        model_path=body.model_path,
    )
    return {"sampling_session_id": sampler_id, "type": "create_sampling_session"}


@router.get("/samplers/{sampler_id}")
def get_sampler(
    sampler_id: Annotated[str, Path(max_length=128)], request: Request, tenant: TenantDep
) -> dict[str, Any]:
    sampler = tinker(request).sampler(tenant.id, sampler_id)
    return {"sampler_id": sampler.id, "base_model": sampler.base_model, "model_path": sampler.model_path}


@router.post("/asample")
def asample(
    body: ASample, request: Request, session: SessionDep, engine: EngineDep, tenant: TenantDep
) -> dict[str, Any]:
    """`num_samples` continuations of the prompt from the sampling session's weights, each a row of the serving
    engine's batch (beside every other run's samples and chat requests, on one base model); their tokens and
    log-probabilities (protobuf) come from `retrieve_future`."""
    service = tinker(request)
    sampler = service.sampler(tenant.id, body.sampling_session_id)
    record = require_model(session, model_id=sampler.base_model, param="base_model")
    session.rollback()
    prompt = [token for chunk in body.prompt.chunks for token in chunk.tokens]
    if not prompt:
        raise InvalidInput("prompt: no tokens", param="prompt")
    params = body.sampling_params
    stop_strings = _stops(params.stop, request.app.state.models, record)
    room = record.max_seq_length - len(prompt)
    max_tokens = params.max_tokens or min(DEFAULT_MAX_TOKENS, room)
    if room < 1 or max_tokens > room:
        raise InvalidInput(
            f"prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) exceeds {record.max_seq_length}",
            param="sampling_params.max_tokens",
        )
    seed = None if params.seed is None else params.seed % 2**32
    requests = [
        GenerationRequest(
            model=record,
            input_ids=prompt,
            adapter=sampler.adapter,
            max_tokens=max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=max(params.top_k, 0),
            seed=choice_seed(seed, i),
            stop=stop_strings,
            ignore_eos=params.stop == [],  # Tinker's `stop: []`: no stop at all, to max_tokens
            logprobs=0,
            owner=tenant.id,
        )
        for i in range(body.num_samples)
    ]
    request_id, pending = service.pending(tenant.id, "Sample")
    try:
        generations = engine.submit_all(requests)
    except (EngineOverloaded, OwnerOverloaded) as exc:
        pending.future.cancel()
        raise TooManyRequests(str(exc), retry_after=1, code=ErrorCode.engine_overloaded) from None
    left = [len(generations)]
    storage = request.app.state.storage

    def finish() -> None:
        if not pending.future.set_running_or_notify_cancel():
            return
        try:
            scored, top = None, None
            if body.prompt_logprobs or body.topk_prompt_logprobs:
                scored, top = service.prompt_logprobs(storage, sampler, record, prompt, body.topk_prompt_logprobs)
            results = [g.result() for g in generations]
            pending.future.set_result(encode_samples(results, scored if body.prompt_logprobs else None, top))
        except Exception as exc:  # a sample's failure (its adapter could not be loaded, say)
            failure = UserError(str(exc)) if isinstance(exc, AdapterUnavailable | UserError) else exc
            pending.future.set_exception(failure)

    def one_done(_: Any) -> None:
        with sampling_lock:
            left[0] -= 1
            if left[0]:
                return
        # Off the engine's thread: scoring the prompt is a forward pass of its own.
        threading.Thread(target=finish, name="tinker-sample", daemon=True).start()

    for generation in generations:
        generation.future.add_done_callback(one_done)
    return {"request_id": request_id, "sample_sequence_ids": [f"{request_id}:{i}" for i in range(body.num_samples)]}


sampling_lock = threading.Lock()


def _stops(stop: Any, models: Any, record: Any) -> list[str]:
    """Stop strings (stop token ids other than the end of sequence are refused: the engine stops on strings and on
    the end of sequence, always)."""
    if stop is None or stop == []:
        return []
    if isinstance(stop, str):
        return [stop]
    if all(isinstance(item, str) for item in stop):
        return list(stop)
    eos = {load_tokenizer(models, record).eos_token_id}
    other = [token for token in stop if token not in eos]
    if other:
        raise InvalidInput(
            f"sampling_params.stop: token {other[0]} is not the end of sequence; stop on strings instead",
            param="sampling_params.stop",
        )
    return []


def store_lora(
    settings: Settings, storage: Any, lora: LoraRun, base_model: str, key: str, *, state: bool = False
) -> tuple[AdapterRef, int]:
    """The LoRA packed as an adapter artifact (PEFT files and Tuneforge's manifest; with `state`, AdamW's state
    too) into the object store under a key of its own: its reference and size."""
    settings.tmp_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_id = secrets.token_hex(12)
    stored_key = f"{key}-{checkpoint_id}.tar.gz"
    with tempfile.TemporaryDirectory(prefix="tinker-", dir=settings.tmp_dir) as tmp:
        folder = Path_(tmp) / "adapter"
        folder.mkdir()
        lora.save_state(folder) if state else lora.export(folder)
        archive = Path_(tmp) / "adapter.tar.gz"
        manifest = {"base_model": base_model, "method": "lora", "format": "peft", "source": "tinker"}
        size, sha256 = adapter_format.pack(folder, archive, manifest)
        storage.put_path(stored_key, archive)
    return AdapterRef(id=f"tinker-{checkpoint_id}", storage_key=stored_key, sha256=sha256, method="lora"), size


def fetch_state(settings: Settings, storage: Any, ref: AdapterRef, lora: LoraRun, *, optimizer: bool) -> None:
    """A saved state loaded into `lora` (its files checked against their digest)."""
    with fetched(settings, storage, ref, "saved state") as folder:
        lora.load_state(folder, optimizer=optimizer)


def encode_samples(
    results: list[GenerationResult], prompt_logprobs: list[float] | None, top_k: tuple[Any, Any] | None = None
) -> bytes:
    """A `tinker_public.SampleResponse`: each sample's tokens and their log-probabilities, and why it stopped; the
    prompt's log-probabilities when asked for."""
    response = wire.SampleResponse()
    if prompt_logprobs is not None:
        response.prompt_logprobs = np.asarray(prompt_logprobs, dtype=np.float32).tobytes()
    if top_k is not None:
        token_ids, logprobs = top_k
        table = response.topk_prompt_logprobs
        table.length, table.k = token_ids.shape
        table.token_ids = token_ids.astype(np.int32).tobytes()
        table.logprobs = logprobs.astype(np.float32).tobytes()
    for result in results:
        sequence = response.sequences.add()
        sequence.stop_reason = wire.STOP_REASON_STOP if result.finish_reason == "stop" else wire.STOP_REASON_LENGTH
        sequence.tokens = np.asarray(result.token_ids, dtype=np.int32).tobytes()
        logprobs = [item.logprob for item in result.logprobs or []]
        sequence.logprobs = np.asarray(logprobs, dtype=np.float32).tobytes()
    return bytes(response.SerializeToString())


# --- futures ----------------------------------------------------------------------------------------------------


@router.post("/retrieve_future")
async def retrieve_future(
    body: Annotated[RetrieveFuture, Body()], request: Request, settings: SettingsDep, tenant: TenantDep
) -> Any:
    """A request's result once it is there, waiting up to TUNEFORGE_TINKER_POLL_SECONDS for it (then `try_again`:
    the client asks again at once); `{"error", "category"}` if it failed."""
    pending = tinker(request).future(tenant.id, body.request_id)
    waited = asyncio.wrap_future(pending.future)
    await asyncio.wait({waited}, timeout=settings.tinker_poll_seconds)  # (cancels nothing when it times out)
    if not pending.future.done():
        return {"type": "try_again", "request_id": body.request_id, "queue_state": "active"}
    failure = pending.future.exception()
    if failure is not None:
        if isinstance(failure, UserError):
            return {"error": str(failure), "category": "user"}
        return {"error": "the request failed on the server; its log says why", "category": "server"}
    result = pending.future.result()
    if isinstance(result, bytes):
        return Response(content=result, media_type=PROTOBUF)
    return result


# --- the wire ---------------------------------------------------------------------------------------------------

DTYPES = {wire.DTYPE_FLOAT32: np.float32, wire.DTYPE_INT64: np.int64, wire.DTYPE_INT32: np.int32}


def decode_tensor(tensor: Any, what: str) -> Any:
    """A `tinker_public.Tensor` as a 1-D torch tensor (dense, or sparse CSR made dense)."""
    import torch

    dtype = DTYPES.get(tensor.dtype)
    if dtype is None:
        raise InvalidInput(f"{what}: dtype {tensor.dtype} is not float32, int64 or int32")
    shape = list(tensor.shape)
    if len(shape) > 1:
        raise InvalidInput(f"{what}: shape {shape}; only one value per position is supported")
    if tensor.WhichOneof("encoding") == "sparse_csr":
        raise InvalidInput(f"{what}: sparse tensors are supported only with two dimensions, which are not")
    values = np.frombuffer(tensor.dense, dtype=dtype)
    if shape and values.size != shape[0]:
        raise InvalidInput(f"{what}: {values.size} values for shape {shape}")
    return torch.from_numpy(values.copy())


def decode_examples(message: Any, settings: Settings) -> list[Example]:
    """The request's data as examples, bounded (count, tokens) before any work."""
    if not message.data:
        raise InvalidInput("data: no examples", param="data")
    if len(message.data) > settings.tinker_max_examples:
        raise InvalidInput(
            f"data: {len(message.data)} examples; at most {settings.tinker_max_examples} a request "
            "(TUNEFORGE_TINKER_MAX_EXAMPLES)",
            param="data",
        )
    examples, longest = [], 0
    for i, datum in enumerate(message.data):
        tokens: list[int] = []
        for chunk in datum.model_input:
            if chunk.WhichOneof("chunk") != "encoded_text":
                raise InvalidInput(f"data[{i}].model_input: only text (encoded_text chunks) is supported")
            tokens.extend(np.frombuffer(chunk.encoded_text.tokens, dtype=np.int32).tolist())
        if not tokens:
            raise InvalidInput(f"data[{i}].model_input: no tokens")
        inputs = {
            name: decode_tensor(t, f"data[{i}].loss_fn_inputs.{name}") for name, t in datum.loss_fn_inputs.items()
        }
        if "target_tokens" not in inputs:
            raise InvalidInput(f"data[{i}].loss_fn_inputs: target_tokens is required")
        for name, values in inputs.items():
            if values.shape[0] != len(tokens):
                raise InvalidInput(
                    f"data[{i}].loss_fn_inputs.{name}: {values.shape[0]} values for {len(tokens)} input tokens"
                )
        longest = max(longest, len(tokens))
        examples.append(Example(tokens=tokens, inputs=inputs))
    padded = longest * len(examples)
    if padded > settings.tinker_max_batch_tokens:
        raise InvalidInput(
            f"data: {len(examples)} examples of up to {longest} tokens make {padded} padded tokens; at most "
            f"{settings.tinker_max_batch_tokens} a request (TUNEFORGE_TINKER_MAX_BATCH_TOKENS): send fewer at once",
            param="data",
        )
    return examples


def encode_output(logprobs: list[Any], metrics: dict[str, float]) -> bytes:
    """A `tinker_public.ForwardBackwardOutput`: one record of every example's `logprobs` (float32), the metrics."""
    output = wire.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    for name, value in metrics.items():
        output.metrics[name] = value
    record = output.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(logprobs))
    arrays = [np.asarray(lp.numpy(), dtype=np.float32) for lp in logprobs]
    field = record.fields["logprobs"]
    field.dtype = wire.DTYPE_FLOAT32
    field.data = b"".join(a.tobytes() for a in arrays)
    field.offsets = np.cumsum([0] + [a.nbytes for a in arrays]).astype(np.int64).tobytes()
    return bytes(output.SerializeToString())
