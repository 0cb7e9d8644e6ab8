"""Graders: one model answer (the `sample`) scored against its data `item`, in OpenAI's grader shapes.

One interface for every grader, so that evals (app/evals/) and a later reinforcement method can both use them as
reward functions: `grader_of(spec)` builds it from its JSON spec (already validated by the API's schemas), and
`grader.grade(item, sample, judge)` returns a `Grade` (a score, whether it passed, and what the grader saw). The
string and text graders are pure functions of their inputs; the model graders ask a `Judge` (a model Tuneforge
serves) for a JSON answer constrained to a schema, so the answer always parses.

- `string_check`: `eq`, `ne`, `like` (contains), `ilike` (contains, ignoring case); 1 or 0.
- `text_similarity`: `fuzzy_match` (rapidfuzz's normalized Indel similarity), `bleu` (sacrebleu's sentence BLEU),
  `gleu` (NLTK's sentence GLEU), `rouge_1`…`rouge_5` and `rouge_l` (Google's rouge-score F-measure), each in
  [0, 1]; passed at `pass_threshold`. `cosine` (needs an embedding model) and `meteor` (needs WordNet's data,
  downloaded at run time) are not served.
- `score_model`: the judge answers `{"result": <number>}`, clamped to `range` (default [0, 1]); passed at
  `pass_threshold` (default: the range's midpoint).
- `label_model`: the judge answers `{"label": <one of labels>}`; passed if the label is one of `passing_labels`.
- `json_schema` (Tuneforge's own, for structured outputs): 1 if `input` (default the answer) parses as JSON and
  validates against `schema`, else 0.

Templates: `{{item.field}}`, `{{item.a.b}}`, `{{sample.output_text}}`, `{{sample.output_json.field}}` (dotted
paths into the namespaces; a string as it is, anything else as JSON, a missing path as ""). No grader runs code
the user sent.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

TEMPLATE = re.compile(r"\{\{\s*([A-Za-z_][\w]*(?:\.[\w-]+)*)\s*\}\}")
NAMESPACES = ("item", "sample")
SIMILARITY_METRICS = ("fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l")
UNSERVED_METRICS = {
    "cosine": "it needs an embedding model, which Tuneforge does not serve",
    "meteor": "it needs WordNet's data, which Tuneforge does not download",
}
STRING_OPERATIONS = ("eq", "ne", "like", "ilike")
DEFAULT_RANGE = (0.0, 1.0)
JUDGE_MAX_TOKENS = 24  # {"result": -12.5} or {"label": "…"}: the schema keeps the answer short


@dataclass(frozen=True)
class Grade:
    score: float
    passed: bool
    sample: dict[str, Any] | None = None  # what a model grader's judge answered (OpenAI's result `sample`)


@dataclass(frozen=True)
class JudgeRequest:
    """What a model grader asks its judge: the rendered messages, and the JSON schema its answer must match."""

    model: str
    messages: list[dict[str, str]]
    schema: dict[str, Any]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = JUDGE_MAX_TOKENS


class Judge(Protocol):
    def __call__(self, request: JudgeRequest) -> str:
        """The judge model's answer (text matching `request.schema`)."""
        ...


class GraderUnavailable(ValueError):
    """A grade that cannot be given (a model grader without a judge): the item is counted as errored."""


def lookup(namespace: dict[str, Any], path: str) -> Any:
    value: Any = namespace
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def render(template: str, item: dict[str, Any], sample: dict[str, Any] | None = None) -> str:
    """The template with each `{{item.…}}` / `{{sample.…}}` replaced (other text, and unknown names, kept)."""
    namespaces = {"item": item, "sample": sample or {}}

    def value(match: re.Match[str]) -> str:
        name, _, path = match.group(1).partition(".")
        if name not in namespaces:
            return match.group(0)
        found = lookup(namespaces[name], path) if path else namespaces[name]
        if found is None:
            return ""
        return found if isinstance(found, str) else json.dumps(found, ensure_ascii=False)

    return TEMPLATE.sub(value, template)


def template_names(template: str) -> list[str]:
    """The namespaces a template refers to (`item`, `sample`, or others, which render() leaves alone)."""
    return [match.group(1).partition(".")[0] for match in TEMPLATE.finditer(template)]


def content_text(content: Any) -> str:
    """A message's content as text: a string, or OpenAI's content parts (`input_text`, `output_text`, …)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, list):
        return "".join(content_text(part) for part in content)
    return ""


def render_messages(
    messages: list[dict[str, Any]], item: dict[str, Any], sample: dict[str, Any] | None
) -> list[dict[str, str]]:
    """Template messages (OpenAI's `EasyInputMessage` / `EvalItem`) as chat messages with their text rendered;
    `developer` is sent as `system`, as chat templates know that role."""
    rendered = []
    for message in messages:
        role = "system" if message["role"] == "developer" else message["role"]
        rendered.append({"role": role, "content": render(content_text(message["content"]), item, sample)})
    return rendered


def sample_namespace(output_text: str) -> dict[str, Any]:
    """The `sample` graders read: the answer's text, and its JSON when it parses as JSON."""
    namespace: dict[str, Any] = {"output_text": output_text}
    with contextlib.suppress(ValueError):
        namespace["output_json"] = json.loads(output_text)
    return namespace


class Grader(Protocol):
    @property
    def name(self) -> str: ...

    def grade(self, item: dict[str, Any], sample: dict[str, Any], judge: Judge | None = None) -> Grade: ...


@dataclass(frozen=True)
class StringCheck:
    name: str
    input: str
    reference: str
    operation: str

    def grade(self, item: dict[str, Any], sample: dict[str, Any], judge: Judge | None = None) -> Grade:
        got, want = render(self.input, item, sample), render(self.reference, item, sample)
        passed = {
            "eq": got == want,
            "ne": got != want,
            "like": want in got,
            "ilike": want.casefold() in got.casefold(),
        }[self.operation]
        return Grade(1.0 if passed else 0.0, passed)


@functools.cache
def _rouge_scorer(name: str) -> Any:
    """One scorer per ROUGE variant for the process (building one per item would repeat its set-up)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([name])


def _rouge(order: str) -> Callable[[str, str], float]:
    name = f"rouge{order.upper()}"

    def score(got: str, want: str) -> float:
        return float(_rouge_scorer(name).score(want, got)[name].fmeasure)

    return score


def _fuzzy(got: str, want: str) -> float:
    from rapidfuzz import fuzz

    return float(fuzz.ratio(got, want)) / 100


def _bleu(got: str, want: str) -> float:
    import sacrebleu

    return min(1.0, float(sacrebleu.sentence_bleu(got, [want]).score) / 100)


def _gleu(got: str, want: str) -> float:
    from nltk.translate.gleu_score import sentence_gleu

    return float(sentence_gleu([want.split()], got.split()))


SIMILARITY: dict[str, Callable[[str, str], float]] = {
    "fuzzy_match": _fuzzy,
    "bleu": _bleu,
    "gleu": _gleu,
    **{f"rouge_{order}": _rouge(order) for order in ("1", "2", "3", "4", "5", "l")},
}


@dataclass(frozen=True)
class TextSimilarity:
    name: str
    input: str
    reference: str
    evaluation_metric: str
    pass_threshold: float

    def grade(self, item: dict[str, Any], sample: dict[str, Any], judge: Judge | None = None) -> Grade:
        score = SIMILARITY[self.evaluation_metric](
            render(self.input, item, sample), render(self.reference, item, sample)
        )
        return Grade(score, score >= self.pass_threshold)


def _judge_messages(
    spec_input: list[dict[str, Any]], item: dict[str, Any], sample: dict[str, Any]
) -> list[dict[str, str]]:
    return render_messages(spec_input, item, sample)


@dataclass(frozen=True)
class ScoreModel:
    name: str
    model: str
    input: list[dict[str, Any]]
    range: tuple[float, float] = DEFAULT_RANGE
    pass_threshold: float | None = None
    sampling_params: dict[str, Any] = field(default_factory=dict)

    def schema(self) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {"result": {"type": "number"}},
            "required": ["result"],
            "additionalProperties": False,
        }

    def grade(self, item: dict[str, Any], sample: dict[str, Any], judge: Judge | None = None) -> Grade:
        if judge is None:
            raise GraderUnavailable(f"{self.name}: no judge model to ask")
        low, high = self.range
        instruction = {
            "role": "system",
            "content": f'Grade the answer. Reply with JSON only: {{"result": <a number from {low:g} to {high:g}>}}.',
        }
        answer = judge(self._request([instruction, *render_messages(self.input, item, sample)]))
        result = float(json.loads(answer)["result"])
        score = min(high, max(low, result))
        threshold = self.pass_threshold if self.pass_threshold is not None else (low + high) / 2
        return Grade(score, score >= threshold, sample={"output_text": answer, "result": result})

    def _request(self, messages: list[dict[str, str]]) -> JudgeRequest:
        params = self.sampling_params
        return JudgeRequest(
            model=self.model,
            messages=messages,
            schema=self.schema(),
            temperature=float(params.get("temperature") or 0.0),
            top_p=float(params.get("top_p") or 1.0),
            seed=params.get("seed"),
            max_tokens=int(params.get("max_completions_tokens") or JUDGE_MAX_TOKENS),
        )


@dataclass(frozen=True)
class LabelModel:
    name: str
    model: str
    input: list[dict[str, Any]]
    labels: tuple[str, ...]
    passing_labels: tuple[str, ...]

    def grade(self, item: dict[str, Any], sample: dict[str, Any], judge: Judge | None = None) -> Grade:
        if judge is None:
            raise GraderUnavailable(f"{self.name}: no judge model to ask")
        schema = {
            "type": "object",
            "properties": {"label": {"type": "string", "enum": list(self.labels)}},
            "required": ["label"],
            "additionalProperties": False,
        }
        labels = ", ".join(json.dumps(label) for label in self.labels)
        instruction = {
            "role": "system",
            "content": f'Label the answer. Reply with JSON only: {{"label": <one of {labels}>}}.',
        }
        answer = judge(
            JudgeRequest(
                model=self.model,
                messages=[instruction, *render_messages(self.input, item, sample)],
                schema=schema,
                max_tokens=JUDGE_MAX_TOKENS + max(len(label) for label in self.labels),
            )
        )
        label = str(json.loads(answer)["label"])
        passed = label in self.passing_labels
        return Grade(1.0 if passed else 0.0, passed, sample={"output_text": answer, "label": label})


@dataclass(frozen=True)
class JsonSchemaCheck:
    name: str
    schema: dict[str, Any]
    input: str = "{{sample.output_text}}"

    def grade(self, item: dict[str, Any], sample: dict[str, Any], judge: Judge | None = None) -> Grade:
        import jsonschema

        try:
            value = json.loads(render(self.input, item, sample))
        except ValueError:
            return Grade(0.0, False, sample={"error": "not JSON"})
        errors = list(jsonschema.Draft202012Validator(self.schema).iter_errors(value))
        if errors:
            return Grade(0.0, False, sample={"error": errors[0].message[:200]})
        return Grade(1.0, True)


def grader_of(spec: dict[str, Any]) -> Grader:
    """The grader a validated testing criterion describes (OpenAI's field names)."""
    kind = spec["type"]
    if kind == "string_check":
        return StringCheck(spec["name"], spec["input"], spec["reference"], spec["operation"])
    if kind == "text_similarity":
        return TextSimilarity(
            spec["name"], spec["input"], spec["reference"], spec["evaluation_metric"], float(spec["pass_threshold"])
        )
    if kind == "score_model":
        low, high = spec.get("range") or DEFAULT_RANGE
        return ScoreModel(
            spec["name"],
            spec["model"],
            spec["input"],
            (float(low), float(high)),
            spec.get("pass_threshold"),
            spec.get("sampling_params") or {},
        )
    if kind == "label_model":
        return LabelModel(
            spec["name"], spec["model"], spec["input"], tuple(spec["labels"]), tuple(spec["passing_labels"])
        )
    if kind == "json_schema":
        return JsonSchemaCheck(spec["name"], spec["schema"], spec.get("input") or "{{sample.output_text}}")
    raise ValueError(f"no grader of type {kind!r}")
