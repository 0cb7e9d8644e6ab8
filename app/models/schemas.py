"""Response bodies for base models: OpenAI's model object plus what a fine-tuning user needs to know."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from app.ml.models import ModelRecord


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = Field(description="`tuneforge` for the built-ins, `operator` for models registered here")
    description: str
    source: str = Field(description="builtin, path, gguf or hf-repo: where the model was registered from")
    architecture: str = Field(description="The transformers model type, e.g. llama, qwen2, gpt2")
    parameters: int
    max_seq_length: int = Field(description="The longest sequence (prompt plus completion) the model takes")
    chat: bool = Field(description="Whether the model has a chat template: chat files and `messages` need one")
    layers: int | None = Field(
        description="Transformer blocks (what layerwise and discriminative count); null for a "
        "model registered before Tuneforge recorded it"
    )
    linear_modules: list[str] = Field(description="What LoRA's `target_modules` may name")
    default_target_modules: list[str] = Field(description="LoRA's `target_modules` when a job names none")
    default: bool = Field(description="Whether jobs and /generate use this model when they name none")
    tool_call_format: str | None = Field(
        description="How its chat template writes tool calls: hermes, llama3_json or mistral; null when it has no "
        "tool support (training files with tool calls need one)"
    )

    @classmethod
    def of(cls, record: ModelRecord, *, default_model: str) -> ModelObject:
        return cls(
            id=record.id,
            created=int(record.created_at.timestamp()),
            owned_by=record.owned_by,
            description=record.description,
            source=record.source,
            architecture=record.architecture,
            parameters=record.n_parameters,
            max_seq_length=record.max_seq_length,
            chat=record.chat_template,
            layers=record.n_layers,
            linear_modules=list(record.linear_modules),
            default_target_modules=list(record.default_target_modules),
            default=record.id == default_model,
            tool_call_format=record.tool_call_format,
        )


class AdapterModelObject(BaseModel):
    """A fine-tuned adapter as an OpenAI model: `model` in /v1/completions and /v1/chat/completions takes its id
    (or its name)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = Field(description="The tenant that trained it")
    parent: str = Field(description="The base model it applies to")
    method: str = Field(description="The fine-tuning method that made it")
    name: str | None = Field(description="Its name (the job's suffix), which `model` takes too")


class ModelDeleted(BaseModel):
    """OpenAI's answer to deleting a fine-tuned model."""

    id: str
    object: Literal["model"] = "model"
    deleted: bool = True
