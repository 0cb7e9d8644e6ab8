"""Structured outputs through the official `openai` client against a live server (uvicorn on loopback): a JSON
schema answered by the tiny random model — garbage unless constrained — with JSON that validates, every time, at
temperature 1; `json_object`; the `parse` helper with a pydantic model; constrained and free requests in one
batch; an answer cut by max_tokens; native /generate; and each refusal a 422 naming its field, before any work."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import httpx
import jsonschema
import pytest
from fastapi import FastAPI
from openai import OpenAI, UnprocessableEntityError
from pydantic import BaseModel, Field

from app.core.settings import Settings
from app.main import create_app
from tests.conftest import Tenant, live

pytestmark = pytest.mark.parametrize("backend", ["embedded"], indirect=True)

MODEL = "tiny-random-llama"
MESSAGES: Any = [{"role": "user", "content": "Describe a person as JSON."}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": ["string", "null"], "maxLength": 24},
        "pets": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"kind": {"enum": ["cat", "dog", "fish"]}, "legs": {"type": "integer", "maximum": 4}},
                "required": ["kind", "legs"],
                "additionalProperties": False,
            },
            "maxItems": 2,
        },
        "member": {"type": "boolean"},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["name", "age", "email", "pets", "member", "score"],
    "additionalProperties": False,
}


def person_format(schema: Any = PERSON) -> Any:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


@pytest.fixture
def server(settings: Settings) -> Iterator[tuple[str, FastAPI]]:
    app = create_app(settings)
    with live(app) as url:
        yield url, app


@pytest.fixture
def openai(server: tuple[str, FastAPI], tenant: Tenant) -> OpenAI:
    return OpenAI(base_url=f"{server[0]}/v1", api_key=tenant.key, max_retries=0)


def test_a_json_schema_is_answered_with_valid_json_20_of_20_times(openai: OpenAI) -> None:
    with ThreadPoolExecutor(4) as pool:  # four calls of five choices at once: the twenty rows decode together
        calls = [
            pool.submit(
                openai.chat.completions.create,
                model=MODEL,
                messages=MESSAGES,
                response_format=person_format(),
                temperature=1.0,
                n=5,
                max_completion_tokens=160,
            )
            for _ in range(4)
        ]
        answers = [choice for call in calls for choice in call.result().choices]
    assert len(answers) == 20
    for choice in answers:
        assert choice.finish_reason == "stop", choice
        assert choice.message.content is not None
        value = json.loads(choice.message.content)
        jsonschema.validate(value, PERSON)
        assert list(value) == list(PERSON["properties"])  # in the schema's order, as OpenAI writes them
    assert len({c.message.content for c in answers}) > 15  # sampled, not one answer over again

    # Streamed, the pieces make the same kind of answer.
    stream = openai.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        response_format=person_format(),
        temperature=1.0,
        seed=11,
        max_completion_tokens=160,
        stream=True,
    )
    pieces = [c.choices[0] for c in stream if c.choices]
    jsonschema.validate(json.loads("".join(p.delta.content or "" for p in pieces)), PERSON)
    assert pieces[-1].finish_reason == "stop"


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    legs: int = Field(ge=0, le=4)


class Person(BaseModel):
    name: str = Field(max_length=16)
    pets: list[Pet] = Field(max_length=2)
    member: bool


def test_the_parse_helper_gets_its_pydantic_model(openai: OpenAI) -> None:
    """`client.chat.completions.parse(response_format=Model)`, unchanged: the strict schema the client derives
    (with `$defs` and `$ref`) is compiled, and the answer parses into the model."""
    for seed in range(3):
        done = openai.chat.completions.parse(
            model=MODEL, messages=MESSAGES, response_format=Person, temperature=1.0, seed=seed, max_tokens=120
        )
        message = done.choices[0].message
        assert isinstance(message.parsed, Person) and message.refusal is None, message


def test_json_object_answers_parse(openai: OpenAI) -> None:
    done = openai.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        response_format={"type": "json_object"},
        temperature=1.0,
        seed=3,  # on a CPU, three of this seed's eight choices end within 64 tokens
        n=8,
        max_tokens=64,
    )
    finished = [c for c in done.choices if c.finish_reason == "stop"]
    assert finished  # any JSON object: the random model wanders in a string past 64 tokens in the others
    for choice in done.choices:
        assert (choice.message.content or "").startswith("{")
    for choice in finished:
        assert isinstance(json.loads(choice.message.content or ""), dict)


@pytest.mark.slow  # the engine-level test (test_serving_logits) runs in the fast tier
def test_constrained_and_free_requests_share_the_batch(openai: OpenAI, server: tuple[str, FastAPI]) -> None:
    _, app = server
    free: Any = {"model": MODEL, "messages": MESSAGES, "temperature": 1.0, "seed": 9, "max_tokens": 40}
    alone = openai.chat.completions.create(**free).choices[0].message.content
    steps = app.state.engine.steps
    with ThreadPoolExecutor(8) as pool:
        constrained = [
            pool.submit(
                openai.chat.completions.create,
                model=MODEL,
                messages=MESSAGES,
                response_format=person_format(),
                temperature=1.0,
                max_tokens=160,
            )
            for _ in range(4)
        ]
        beside = [pool.submit(openai.chat.completions.create, **free) for _ in range(4)]
        for future in constrained:
            jsonschema.validate(json.loads(future.result().choices[0].message.content or ""), PERSON)
        assert [f.result().choices[0].message.content for f in beside] == [alone] * 4
    assert app.state.engine.steps - steps < 4 * 40 + 160  # they decoded together


def test_an_answer_cut_by_max_tokens_ends_with_length(openai: OpenAI) -> None:
    """OpenAI's behaviour: the JSON so far, unfinished, with finish_reason "length" (check it before parsing)."""
    long = {"type": "object", "properties": {"story": {"type": "string", "minLength": 500}}, "required": ["story"]}
    done = openai.chat.completions.create(
        model=MODEL, messages=MESSAGES, response_format=person_format(long), max_tokens=10, temperature=1.0
    )
    assert done.choices[0].finish_reason == "length"
    assert (done.choices[0].message.content or "").startswith('{"story":"')
    assert done.usage is not None and done.usage.completion_tokens == 10


def test_native_generate_takes_the_same_response_format(server: tuple[str, FastAPI], tenant: Tenant) -> None:
    url, _ = server
    body = {
        "base_model": MODEL,
        "messages": MESSAGES,
        "response_format": person_format(),
        "temperature": 1.0,
        "max_tokens": 160,
    }
    r = httpx.post(f"{url}/generate", headers=tenant.headers, json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["finish_reason"] == "stop"
    jsonschema.validate(json.loads(r.json()["text"]), PERSON)
    refused = httpx.post(
        f"{url}/generate", headers=tenant.headers, json={**body, "response_format": person_format({"not": {}})}
    )
    assert refused.status_code == 422 and refused.json()["error"]["param"] == "response_format.json_schema.schema"


def nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.mark.parametrize(
    ("response_format", "param", "says"),
    [
        (person_format({"type": "object", "if": {"type": "string"}}), "response_format.json_schema.schema", '"if"'),
        (
            person_format({"type": "object", "$ref": "https://example.com/s.json"}),
            "response_format.json_schema.schema",
            "fetch",
        ),
        (person_format({"type": "string", "pattern": "(a"}), "response_format.json_schema.schema", "regex"),
        (person_format(nested(40)), "response_format.json_schema.schema", "deeper than 32"),
        (
            person_format({"enum": [f"value {i}" for i in range(5000)]}),
            "response_format.json_schema.schema",
            "longer than 32768",
        ),
        ({"type": "json_schema"}, "response_format.json_schema", "required"),
        ({"type": "json_object", "json_schema": {"name": "x", "schema": {}}}, "response_format.json_schema", "only"),
        ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "response_format.json_schema.name", ""),
        ({"type": "yaml"}, "response_format.type", ""),
    ],
)
def test_each_refusal_names_its_field(
    openai: OpenAI, server: tuple[str, FastAPI], response_format: Any, param: str, says: str
) -> None:
    _, app = server
    with pytest.raises(UnprocessableEntityError) as refused:
        openai.chat.completions.create(model=MODEL, messages=MESSAGES, response_format=response_format, max_tokens=4)
    assert refused.value.param == param, refused.value.message
    assert says in refused.value.message
    assert "/" not in refused.value.message.replace("https://example.com/s.json", "")  # no paths of the server's
    if param.endswith(".schema") and says not in ("deeper than 32", "longer than 32768"):
        assert refused.value.code == "unsupported_schema"
    assert app.state.engine is None or app.state.engine.steps == 0  # refused before any work
