"""Request and response bodies of OpenAI's inference API (`/v1/completions`, `/v1/chat/completions`).

As the official clients send and read them. Parameters Tuneforge does not implement are accepted only at their
neutral value (`echo` false, no `tools`): a client that relies on them gets a clear 422, not other text.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator, model_validator

from app.inference.schemas import (
    MAX_LOGIT_BIAS,
    MAX_MESSAGES,
    MAX_NEW_TOKENS,
    MAX_PROMPT_CHARS,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_TOP_K,
    LogitBias,
    Penalty,
    ResponseFormat,
    Usage,
)

Stop = list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]] | None
MAX_CONTENT_PARTS = 64


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        max_length=200, description="A base model id, or an adapter's id (`adapter-…`, `ftckpt-…`) or name"
    )
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=MAX_TOP_K, description="Tuneforge's extension: the k most likely tokens only")
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    stop: Stop = Field(None, max_length=MAX_STOP_STRINGS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(
        1, ge=1, le=128, description="Choices to generate, each sampled apart (at most TUNEFORGE_SERVING_MAX_CHOICES)"
    )
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: LogitBias = Field(
        None,
        description=f"Token id (a string) → a bias from -100 to 100 added to its logit (≤ {MAX_LOGIT_BIAS} tokens)",
    )
    user: str | None = Field(None, max_length=256, description="Accepted and not recorded")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value


Prompt = Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS)]


class CompletionRequest(_Common):
    prompt: Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=1)] = Field(
        description=f"The text to continue, at most {MAX_PROMPT_CHARS} characters (a list of one string too)"
    )
    max_tokens: int = Field(16, ge=1, le=MAX_NEW_TOKENS)
    logprobs: int | None = Field(None, ge=0, le=5, description="Log-probabilities of the chosen and top tokens")
    echo: bool = Field(False, description="Not implemented: false only")

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported")
        return value

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str:
        return value[0] if isinstance(value, list) else value


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str = Field(max_length=MAX_PROMPT_CHARS)


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: Prompt | Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS)]
    name: str | None = Field(None, max_length=64)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS, description="Deprecated by OpenAI; as below")
    max_completion_tokens: int | None = Field(
        None, ge=1, le=MAX_NEW_TOKENS, description="Default: up to 512 tokens, within the model's context"
    )

    @field_validator("max_completion_tokens")
    @classmethod
    def _one_bound(cls, value: int | None, info: ValidationInfo) -> int | None:
        other = info.data.get("max_tokens")
        if value is not None and other is not None and other != value:
            raise ValueError(f"max_completion_tokens ({value}) and max_tokens ({other}) differ: give one")
        return value

    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = Field(None, max_length=0, description="Not implemented: none")

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if sum(len(m.text()) for m in self.messages) > MAX_PROMPT_CHARS:
            raise ValueError(f"messages hold more than {MAX_PROMPT_CHARS} characters of content in all")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def chat(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: CompletionLogprobs | None = None
    finish_reason: str


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ContentLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[ContentLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: str | None = None  # always null: the engine never refuses (OpenAI always sends it)


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
