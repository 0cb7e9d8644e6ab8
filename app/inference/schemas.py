"""Request and response bodies for /generate, and the usage OpenAI's inference API reports too."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from app.ml.serving import GenerationResult

# Bounds on every field, checked before any work: a prompt is tokenized only once it is known to be small.
MAX_PROMPT_CHARS = 65_536  # about 16k tokens, twice the longest context of the built-in models
MAX_MESSAGES = 256
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
MAX_NEW_TOKENS = 4096
MAX_TOP_K = 1000


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter_id: str | None = Field(
        None,
        max_length=64,
        description="Adapter to apply, or a job's checkpoint (`ftckpt-…`); absent = the base model alone",
    )
    base_model: str | None = Field(
        None, max_length=128, description="Base model when no adapter is given (default from settings)"
    )
    prompt: str | None = Field(
        None,
        max_length=MAX_PROMPT_CHARS,
        description=f"Raw text prompt, no chat template (≤ {MAX_PROMPT_CHARS} characters)",
    )
    messages: list[ChatMessage] | None = Field(
        None,
        max_length=MAX_MESSAGES,
        description=f"Chat messages, rendered with the chat template (≤ {MAX_MESSAGES} messages, "
        f"≤ {MAX_PROMPT_CHARS} characters of content in all)",
    )
    max_tokens: int = Field(128, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(1.0, ge=0, le=2, description="0 (or below 1e-5) = greedy; higher is more random")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=MAX_TOP_K, description="Sample among the k most likely tokens only (0: all)")
    seed: int | None = Field(
        None, ge=0, le=2**32 - 1, description="Same seed, same text: the request has its own random generator"
    )
    stream: bool = Field(False, description="Send the text as server-sent events, token by token")
    stop: list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]] | None = Field(
        None,
        max_length=MAX_STOP_STRINGS,
        description=f"Up to {MAX_STOP_STRINGS} strings (each ≤ {MAX_STOP_CHARS} characters) that end the completion; "
        "a single string is accepted too",
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.messages is not None:
            if not self.messages:
                raise ValueError("messages must not be empty")
            if sum(len(m.content) for m in self.messages) > MAX_PROMPT_CHARS:
                raise ValueError(f"messages hold more than {MAX_PROMPT_CHARS} characters of content in all")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, result: GenerationResult) -> Usage:
        return cls(
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            total_tokens=result.prompt_tokens + result.completion_tokens,
        )


class GenerateResponse(BaseModel):
    object: Literal["generation"] = "generation"
    text: str
    adapter_id: str | None
    base_model: str
    finish_reason: str
    usage: Usage
