"""Request and response bodies of OpenAI's inference API (`/v1/completions`, `/v1/chat/completions`).

As the official clients send and read them. Parameters Tuneforge does not implement are accepted only at their
neutral value (`echo` false) or not at all (the older `functions`): a client that relies on them gets a clear 422,
not other text.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator, model_validator

from app.core.errors import FieldError
from app.inference import service
from app.inference.schemas import (
    MAX_LOGIT_BIAS,
    MAX_MESSAGES,
    MAX_NEW_TOKENS,
    MAX_PROMPT_CHARS,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_TOP_K,
    JsonSchema,
    LogitBias,
    Penalty,
    ResponseFormat,
    Usage,
)
from app.ml.jsonl import LineIssue
from app.ml.tool_calls import (
    FUNCTION_NAME,
    MAX_TOOL_CALL_ID_CHARS,
    MAX_TOOL_CALLS,
    MAX_TOOLS,
    ToolLineChecker,
    chat_inputs,
)

# The field a tool-calling issue names first: `tools[0].function.name: …`.
ISSUE_FIELD = re.compile(r"([a-z_]+(?:\[\d+\])?(?:\.[a-z_]+(?:\[\d+\])?)*): ")
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


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=64, pattern=f"^{FUNCTION_NAME.pattern}$")
    description: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    parameters: JsonSchema | None = Field(None, description="A JSON schema of the arguments (an object)")
    strict: bool | None = Field(None, description="Accepted; arguments always match `parameters` when constrained")


class ToolSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionSpec


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=64)


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionName


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=64)
    arguments: str = Field(max_length=MAX_PROMPT_CHARS, description="The arguments, a JSON object as a string")


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(max_length=MAX_TOOL_CALL_ID_CHARS)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Prompt | Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS)] | None = None
    name: str | None = Field(None, max_length=64)
    tool_calls: list[ToolCall] | None = Field(
        None, max_length=MAX_TOOL_CALLS, description="An assistant message's calls"
    )
    tool_call_id: str | None = Field(
        None, max_length=MAX_TOOL_CALL_ID_CHARS, description="The call a `tool` message answers"
    )
    refusal: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="As answered; not rendered")

    @model_validator(mode="after")
    def _fits_role(self) -> ChatMessageIn:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (it may be null only in an assistant message with tool_calls)")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls: only an assistant message makes calls")
        if (self.tool_call_id is None) == (self.role == "tool"):
            raise ValueError("tool_call_id: a tool message needs one, and only a tool message has one")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)

    def as_record(self) -> dict[str, Any]:
        """The message as a training line holds it (OpenAI's shape; `developer` is the older `system`)."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


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
    tools: list[ToolSpec] | None = Field(
        None,
        max_length=MAX_TOOLS,
        description="Functions the model may call (a model whose chat template renders tools: `tool_call_format`)",
    )
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None,
        description="Default `auto` with tools; `required` and a named function constrain the output to calls",
    )
    parallel_tool_calls: bool | None = Field(None, description="Whether one answer may make several calls (default)")

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if sum(len(m.text()) for m in self.messages) > MAX_PROMPT_CHARS:
            raise ValueError(f"messages hold more than {MAX_PROMPT_CHARS} characters of content in all")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise FieldError("needs tools: declare the functions the model may call", "tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice):
            named = self.tool_choice.function.name
            if named not in {tool.function.name for tool in self.tools or []}:
                raise FieldError(f"{named!r} is not one of the tools", "tool_choice")
        try:  # the tools and the conversation's calls and results, as a training line's are checked
            checker = ToolLineChecker(self._record(), whole="the request")
            for i, message in enumerate(self.messages):
                checker.before(i, message.role)
                if message.role == "assistant" and message.tool_calls:
                    checker.calls(i, message.as_record())
                elif message.role == "tool":
                    checker.result(i, "tool", message.as_record())
        except LineIssue as issue:  # its message starts with the field it is about, where it is about one
            about = ISSUE_FIELD.match(issue.message)
            if about is None:
                raise ValueError(issue.message) from None
            raise FieldError(issue.message[len(about[0]) :], about[1]) from None
        return self

    def _record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"messages": [m.as_record() for m in self.messages]}
        if self.tools:
            record["tools"] = [tool.model_dump(exclude_none=True) for tool in self.tools]
        if self.parallel_tool_calls is not None:
            record["parallel_tool_calls"] = self.parallel_tool_calls
        return record

    def chat(self) -> list[dict[str, Any]]:
        """The messages as the chat template takes them (calls' arguments as objects, ids as templates need)."""
        return chat_inputs(self._record())[0]

    def tool_use(self) -> service.ToolUse | None:
        """The tools the model may call and how (None: none declared)."""
        if not self.tools:
            return None
        choice = self.tool_choice or "auto"
        return service.ToolUse(
            tools=[tool.model_dump(exclude_none=True) for tool in self.tools],
            choice=choice if isinstance(choice, str) else choice.function.name,
            named=isinstance(choice, NamedToolChoice),
            parallel=self.parallel_tool_calls is not False,
        )


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
    refusal: list[ContentLogprob] | None = None  # always null (OpenAI always sends it)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # null when the answer is only tool calls
    refusal: str | None = None  # always null: the engine never refuses (OpenAI always sends it)
    tool_calls: list[ToolCall] | None = Field(default=None, exclude_if=lambda calls: calls is None)  # absent: none


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
