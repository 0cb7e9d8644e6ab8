"""HTTP routes of Tinker's protocol (`/api/v1/…`), as the official `tinker` client calls them: its handshake,
sessions and heartbeats, server capabilities, LoRA training runs (`create_model`, `get_info`, `forward_backward`
in protobuf, `optim_step`) and the futures it polls (`retrieve_future`). docs/design/tinker-protocol.md has the
protocol; the client authenticates with `X-API-Key: tml-<Tuneforge key>` (app/core/middleware.py).

Request bodies ignore fields they do not know: the client adds some (`type`, `sdk_version`, …) and newer ones more.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Body, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.core.deps import SessionDep, SettingsDep, TenantDep
from app.core.errors import InvalidInput, error_responses
from app.core.settings import Settings
from app.ml.training.stepwise import LOSSES, Example, LoraRun
from app.models.service import list_models, require_model
from app.tinker import wire
from app.tinker.service import TinkerService, UserError

router = APIRouter(prefix="/api/v1", tags=["tinker"], responses=error_responses(401, 404, 409, 410, 422))
PROTOBUF = "application/x-protobuf"


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


class RetrieveFuture(_Body):
    request_id: str = Field(max_length=64)


def tinker(request: Request) -> TinkerService:
    return request.app.state.tinker  # type: ignore[no-any-return]


# --- handshake, sessions, capabilities ------------------------------------------------------------------------


@router.post("/client/config")
def client_config(settings: SettingsDep, tenant: TenantDep) -> dict[str, Any]:
    """What the client is to do here: no JWT exchange, httpx as its transport, the chunks of one forward/backward
    sent in order and no larger than this server takes."""
    return {
        "pjwt_auth_enabled": False,
        "use_pyqwest_transport": False,
        "parallel_fwdbwd_chunks": False,
        "fwdbwd_max_chunk_len": settings.tinker_max_examples,
        "fwdbwd_max_chunk_bytes_count": settings.tinker_max_request_bytes // 2,
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
    """The registered base models, each trainable with LoRA here (sampling comes with a later release)."""
    return {
        "supported_models": [
            {"model_name": m.id, "max_context_length": m.max_seq_length, "trainable": True, "sampleable": False}
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
        return encode_output(result.logprobs, result.metrics)

    kind = "Forward" if forward_only else "ForwardBackward"
    return {"request_id": service.submit(run, message.seq_id, kind, work), "model_id": run.model_id}


@router.post("/optim_step")
def optim_step(body: OptimStep, request: Request, tenant: TenantDep) -> dict[str, Any]:
    service = tinker(request)
    run = service.run(tenant.id, body.model_id)
    adam = body.adam_params.model_dump()

    def work(lora: LoraRun) -> dict[str, Any]:
        return {"metrics": lora.optim_step(**adam), "type": "optim_step"}

    return {"request_id": service.submit(run, body.seq_id, "OptimStep", work), "model_id": run.model_id}


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
