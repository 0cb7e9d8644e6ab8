"""Request and response bodies for /generate, and the usage OpenAI's inference API reports too."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from app.ml.serving import GenerationResult

# Bounds on every field, checked before any work: a prompt is tokenized only once it is known to be small.
MAX_PROMPT_CHARS = 65_536  # about 16k tokens, twice the longest context of the built-in models
MAX_MESSAGES = 256
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
MAX_NEW_TOKENS = 4096
MAX_TOP_K = 1000
MAX_LOGIT_BIAS = 300  # tokens one request may bias
MAX_SCHEMA_CHARS = 32_768  # a structured output's JSON schema, as compact JSON
MAX_SCHEMA_DEPTH = 32  # ... and its nesting (objects and arrays of the schema document)

Penalty = Annotated[float, Field(ge=-2, le=2)]


def _token_id(key: str) -> str:
    if not key.isascii() or not key.isdigit():
        raise ValueError("a token id: digits only")
    return key


TokenId = Annotated[str, StringConstraints(min_length=1, max_length=9), AfterValidator(_token_id)]
LogitBias = Annotated[
    dict[TokenId, Annotated[float, Field(ge=-100, le=100)]] | None,
    Field(max_length=MAX_LOGIT_BIAS),
]
# A JSON schema, as the API document describes it: an object whose size the checks below bound (a member takes at
# least four characters of the 32,768, so no object in it has more than 8,192).
SCHEMA_DOCUMENT = {
    "type": "object",
    "maxProperties": MAX_SCHEMA_CHARS // 4,
    "propertyNames": {"maxLength": MAX_SCHEMA_CHARS},
    "additionalProperties": {},
}


def logit_bias_ids(bias: dict[str, float] | None) -> dict[int, float]:
    """`logit_bias` with its keys (token ids, as JSON object keys are strings) as ints."""
    return {int(token): value for token, value in (bias or {}).items()}


def _depth(value: Any) -> int:
    """How deep objects and arrays nest in a JSON value (a scalar: 0)."""
    depth, level = 0, [value]
    while level := [item for item in level if isinstance(item, dict | list)]:
        depth += 1
        level = [child for item in level for child in (item.values() if isinstance(item, dict) else item)]
    return depth


def _bounded_schema(value: dict[str, Any]) -> dict[str, Any]:
    if _depth(value) > MAX_SCHEMA_DEPTH:
        raise ValueError(f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
    if len(json.dumps(value, separators=(",", ":"))) > MAX_SCHEMA_CHARS:
        raise ValueError(f"the schema is longer than {MAX_SCHEMA_CHARS} characters as compact JSON")
    return value


# A JSON schema in a request (a response format's, a tool's parameters): bounded in size and nesting.
JsonSchema = Annotated[dict[str, Any], WithJsonSchema(SCHEMA_DOCUMENT), AfterValidator(_bounded_schema)]


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description="The schema's name (OpenAI's rule)")
    description: str | None = Field(None, max_length=4096)
    json_schema: JsonSchema = Field(
        alias="schema",
        description=f"A JSON schema (≤ {MAX_SCHEMA_CHARS} characters as compact JSON, nested ≤ {MAX_SCHEMA_DEPTH} "
        "levels); keywords the compiler does not implement are refused (422 `unsupported_schema`)",
    )
    strict: bool | None = Field(None, description="Accepted; the output is always constrained to the schema")


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: `{"type": "text"}` (the default), `{"type": "json_object"}` (any JSON object) or
    `{"type": "json_schema", "json_schema": {"name", "schema", "strict"?, "description"?}}`."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(None, validate_default=True)

    @field_validator("json_schema")
    @classmethod
    def _with_type(cls, value: JsonSchemaFormat | None, info: ValidationInfo) -> JsonSchemaFormat | None:
        kind = info.data.get("type")
        if kind == "json_schema" and value is None:
            raise ValueError('required with "type": "json_schema"')
        if kind != "json_schema" and value is not None:
            raise ValueError(f'only with "type": "json_schema", not {kind!r}')
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter_id: str | None = Field(
        None,
        max_length=400,
        description="Adapter to apply, a job's checkpoint (`ftckpt-…`), or weights a Tinker run saved "
        "(`tinker://…`); absent = the base model alone",
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
    presence_penalty: Penalty = Field(0.0, description="OpenAI's: less this from a token's logit once generated")
    frequency_penalty: Penalty = Field(0.0, description="OpenAI's: less this times the times a token was generated")
    logit_bias: LogitBias = Field(
        None,
        description=f"Token id (a string) → a bias from -100 to 100 added to its logit (≤ {MAX_LOGIT_BIAS} tokens)",
    )
    response_format: ResponseFormat | None = Field(
        None,
        description='As OpenAI\'s: {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name", '
        '"schema"}} constrain the text to JSON (grammar-constrained decoding)',
    )
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

    @classmethod
    def of_choices(cls, results: list[GenerationResult]) -> Usage:
        """A call's tokens: its prompt once, its choices' completions together (as OpenAI counts them)."""
        completion = sum(result.completion_tokens for result in results)
        prompt = results[0].prompt_tokens
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class GenerateResponse(BaseModel):
    object: Literal["generation"] = "generation"
    text: str
    adapter_id: str | None
    base_model: str
    finish_reason: str
    usage: Usage
