"""Evals' request and response bodies, in OpenAI's Evals API shape (the official client's `evals.*` sends and reads
them); graders' fields as OpenAI names them (app/ml/graders.py scores with them)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    field_validator,
)

from app.core.errors import FieldError
from app.inference.schemas import JsonSchema, JsonSchemaFormat
from app.ml.graders import SIMILARITY_METRICS, UNSERVED_METRICS

MAX_METADATA_PAIRS = 16
MetadataKey = Annotated[str, StringConstraints(max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]
Metadata = dict[MetadataKey, MetadataValue]
Name = Annotated[str, StringConstraints(max_length=256)]
MAX_MESSAGES = 64  # messages of one template
MAX_LABELS = 64
MAX_CRITERIA = 256  # the most TUNEFORGE_EVAL_MAX_CRITERIA allows; the setting bounds each eval
MAX_ITEMS = 100_000  # the most TUNEFORGE_EVAL_MAX_ITEMS allows; the setting bounds each run
MAX_TEXT_CHARS = 1024 * 1024  # a template's text (the request's size bounds it first; the setting, their sum)
MAX_OBJECT_CHARS = 1024 * 1024  # a data item or a criterion, as compact JSON (the setting bounds items tighter)
Text = Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]
# A JSON object of the user's (a data item, a testing criterion), as the API document describes it: a bounded map.
OBJECT_DOCUMENT = {
    "type": "object",
    "maxProperties": MAX_OBJECT_CHARS // 4,
    "propertyNames": {"maxLength": MAX_OBJECT_CHARS},
    "additionalProperties": {},
}
JsonObject = Annotated[dict[str, Any], WithJsonSchema(OBJECT_DOCUMENT)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputMessage(Strict):
    """OpenAI's `EasyInputMessage` / `EvalItem`: a role and content (text, or content parts holding text)."""

    role: Literal["user", "assistant", "system", "developer"]
    content: Text | JsonObject | Annotated[list[JsonObject], Field(max_length=MAX_MESSAGES)] = Field(
        union_mode="left_to_right"
    )
    type: Literal["message"] | None = None


class StringCheck(Strict):
    type: Literal["string_check"]
    name: Name
    input: Text
    reference: Text
    operation: Literal["eq", "ne", "like", "ilike"]


class TextSimilarity(Strict):
    type: Literal["text_similarity"]
    name: Name
    input: Text
    reference: Text
    evaluation_metric: str
    pass_threshold: float = Field(ge=0, le=1)

    @field_validator("evaluation_metric")
    @classmethod
    def _served(cls, metric: str) -> str:
        if metric in UNSERVED_METRICS:
            raise ValueError(
                f"{metric} is not served: {UNSERVED_METRICS[metric]}; use one of {', '.join(SIMILARITY_METRICS)}"
            )
        if metric not in SIMILARITY_METRICS:
            raise ValueError(f"must be one of {', '.join(SIMILARITY_METRICS)}")
        return metric


class JudgeSampling(Strict):
    reasoning_effort: Annotated[str, StringConstraints(max_length=16)] | None = Field(
        None, description="Accepted and ignored: no model served here reasons"
    )
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    max_completions_tokens: int | None = Field(None, ge=8, le=256)


class ScoreModel(Strict):
    type: Literal["score_model"]
    name: Name
    model: Annotated[str, StringConstraints(max_length=400)]
    input: list[InputMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    range: list[float] | None = Field(None, min_length=2, max_length=2)
    pass_threshold: float | None = None
    sampling_params: JudgeSampling | None = None

    @field_validator("range")
    @classmethod
    def _ordered(cls, bounds: list[float] | None) -> list[float] | None:
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError("must be [low, high] with low < high")
        return bounds


class LabelModel(Strict):
    type: Literal["label_model"]
    name: Name
    model: Annotated[str, StringConstraints(max_length=400)]
    input: list[InputMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    labels: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] = Field(
        min_length=1, max_length=MAX_LABELS
    )
    passing_labels: list[str] = Field(min_length=1, max_length=MAX_LABELS)

    @field_validator("passing_labels")
    @classmethod
    def _subset(cls, passing: list[str], info: Any) -> list[str]:
        unknown = [label for label in passing if label not in (info.data.get("labels") or [])]
        if unknown:
            raise ValueError(f"{unknown[0][:64]!r} is not one of `labels`")
        return passing


class JsonSchemaCheck(Strict):
    """Tuneforge's own grader (not in OpenAI's set): the answer is JSON valid against `schema`."""

    type: Literal["json_schema"]
    name: Name
    schema_: JsonSchema = Field(alias="schema")
    input: Text | None = None


Criterion = Annotated[
    StringCheck | TextSimilarity | ScoreModel | LabelModel | JsonSchemaCheck, Field(discriminator="type")
]
CRITERION = TypeAdapter(Criterion)
NOT_SERVED = {
    "python": "the python grader runs code a user sent, which Tuneforge never does",
    "multi": "the multi grader combines graders with a formula Tuneforge does not evaluate",
}
CRITERION_TYPES = ("string_check", "text_similarity", "score_model", "label_model", "json_schema")


def parse_criterion(index: int, raw: Any) -> dict[str, Any]:
    """One testing criterion, checked; as stored (OpenAI's field names). A refusal names the field."""
    where = f"testing_criteria[{index}]"
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind in NOT_SERVED:
        raise FieldError(f"graders of type {kind} are not served: {NOT_SERVED[kind]}", f"{where}.type")
    if kind not in CRITERION_TYPES:
        raise FieldError(f"must be one of {', '.join(CRITERION_TYPES)}", f"{where}.type")
    try:
        parsed = CRITERION.validate_python(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        path = ".".join(str(part) for part in first["loc"][1:])  # past the union's tag
        message = str(first["msg"]).removeprefix("Value error, ")
        raise FieldError(message, f"{where}.{path}" if path else where) from None
    return parsed.model_dump(by_alias=True, exclude_none=True)


class CustomDataSourceConfig(Strict):
    type: Literal["custom"]
    item_schema: JsonSchema
    include_sample_schema: bool = False


class EvalCreate(Strict):
    name: Name | None = None
    data_source_config: CustomDataSourceConfig
    testing_criteria: list[JsonObject] = Field(min_length=1, max_length=MAX_CRITERIA)
    metadata: Metadata | None = Field(None, max_length=MAX_METADATA_PAIRS)

    @field_validator("testing_criteria")
    @classmethod
    def _criteria(cls, criteria: list[dict[str, Any]]) -> list[dict[str, Any]]:
        checked = [parse_criterion(i, raw) for i, raw in enumerate(criteria)]
        names = [c["name"] for c in checked]
        for i, name in enumerate(names):
            if names.index(name) != i:
                raise FieldError(
                    f"another criterion is also named {name[:64]!r}: names must differ", f"testing_criteria[{i}].name"
                )
        return checked


class EvalUpdate(Strict):
    name: Name | None = None
    metadata: Metadata | None = Field(None, max_length=MAX_METADATA_PAIRS)


class EvalObject(BaseModel):
    object: Literal["eval"] = "eval"
    id: str
    name: str
    data_source_config: dict[str, Any]
    testing_criteria: list[dict[str, Any]]
    created_at: int
    metadata: dict[str, str] | None


class EvalDeleted(BaseModel):
    object: Literal["eval.deleted"] = "eval.deleted"
    deleted: bool = True
    eval_id: str


# --- runs --------------------------------------------------------------------------------------------------
class DataItem(Strict):
    item: JsonObject
    sample: JsonObject | None = None


class FileContent(Strict):
    type: Literal["file_content"]
    content: list[DataItem] = Field(min_length=1, max_length=MAX_ITEMS)


class FileId(Strict):
    type: Literal["file_id"]
    id: Annotated[str, StringConstraints(max_length=64)]


Source = Annotated[FileContent | FileId, Field(discriminator="type")]


class Template(Strict):
    type: Literal["template"]
    template: list[InputMessage] = Field(min_length=1, max_length=MAX_MESSAGES)


class ItemReference(Strict):
    type: Literal["item_reference"]
    item_reference: Annotated[str, StringConstraints(max_length=256)]


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class RunSampling(Strict):
    reasoning_effort: Annotated[str, StringConstraints(max_length=16)] | None = Field(
        None, description="Accepted and ignored: no model served here reasons"
    )
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = Field(42, ge=0, le=2**32 - 1)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    response_format: ResponseFormat | None = None
    tools: list[JsonObject] | None = Field(None, max_length=0, description="Not supported in eval runs: none")


class CompletionsSource(Strict):
    """OpenAI's `completions` run data source: answers generated from `input_messages` by `model`."""

    type: Literal["completions"]
    source: Source
    input_messages: Annotated[Template | ItemReference, Field(discriminator="type")] | None = None
    model: Annotated[str, StringConstraints(min_length=1, max_length=400)]
    sampling_params: RunSampling | None = None


class JsonlSource(Strict):
    """OpenAI's `jsonl` run data source: items that already hold their answers (`sample`), graded as given."""

    type: Literal["jsonl"]
    source: Source


class RunCreate(Strict):
    name: Name | None = None
    data_source: Annotated[CompletionsSource | JsonlSource, Field(discriminator="type")]
    metadata: Metadata | None = Field(None, max_length=MAX_METADATA_PAIRS)


class ResultCounts(BaseModel):
    total: int
    errored: int
    failed: int
    passed: int


class CriterionResult(BaseModel):
    testing_criteria: str
    passed: int
    failed: int


class ModelUsage(BaseModel):
    model_name: str
    invocation_count: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = 0


class RunError(BaseModel):
    code: str
    message: str


class RunObject(BaseModel):
    object: Literal["eval.run"] = "eval.run"
    id: str
    eval_id: str
    name: str
    model: str
    status: str
    created_at: int
    report_url: str
    data_source: dict[str, Any]
    result_counts: ResultCounts
    per_model_usage: list[ModelUsage]
    per_testing_criteria_results: list[CriterionResult]
    metadata: dict[str, str] | None
    error: RunError | None


class RunDeleted(BaseModel):
    object: Literal["eval.run.deleted"] = "eval.run.deleted"
    deleted: bool = True
    run_id: str


class OutputItemObject(BaseModel):
    object: Literal["eval.run.output_item"] = "eval.run.output_item"
    id: str
    run_id: str
    eval_id: str
    created_at: int
    status: str
    datasource_item_id: int
    datasource_item: dict[str, Any]
    results: list[dict[str, Any]]
    sample: dict[str, Any]
