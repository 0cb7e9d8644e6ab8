"""Request and response bodies for /generate."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter_id: str | None = Field(None, description="Adapter to apply; absent = the base model alone")
    base_model: str | None = Field(None, description="Base model when no adapter is given (default from settings)")
    prompt: str | None = Field(None, description="Raw text prompt (no chat template)")
    messages: list[ChatMessage] | None = Field(None, description="Chat messages, rendered with the chat template")
    max_tokens: int = Field(128, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    stop: list[str] | None = Field(None, description="Up to 4 strings that end the completion")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _stop_bounds(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (len(value) > 4 or any(not s for s in value)):
            raise ValueError("at most 4 non-empty stop strings")
        return value

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.messages is not None and not self.messages:
            raise ValueError("messages must not be empty")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(BaseModel):
    object: Literal["generation"] = "generation"
    text: str
    adapter_id: str | None
    base_model: str
    finish_reason: str
    usage: Usage
