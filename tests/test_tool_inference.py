"""Tool calling at inference, through the official `openai` client against a live server: `tools` rendered by the
model's chat template, `tool_choice` "required" and a named function answered with calls that parse and match
the declared parameters every time (the tiny random model writes garbage unless constrained), streamed as OpenAI
streams tool-call deltas, `auto` read as calls where the answer makes them, multi-turn conversations with calls
and results, and each refusal a 422 naming its field. The grammars and the stream splitter of each family
(Hermes, Llama 3.x JSON, Mistral) are checked in the library too."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import llguidance
import llguidance.hf
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI, UnprocessableEntityError
from transformers import AutoTokenizer

from app.core.settings import Settings
from app.main import create_app
from app.ml.tool_calls import StreamedCalls, call_grammar, format_tool_calls, parse_tool_calls, special_tokens
from tests.conftest import Tenant, live
from tests.test_tool_calls import LLAMA3_TOKENS, MISTRAL_TOKENS, template_tokenizer
from tests.test_tool_files import WEATHER, register_hermes

EMBEDDED = pytest.mark.parametrize("backend", ["embedded"], indirect=True)  # the API tests: one backend

TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET", "JST"]}, "hours_ahead": {"type": "integer", "maximum": 9}},
            "required": ["zone", "hours_ahead"],
            "additionalProperties": False,
        },
    },
}
# The city bounded: the random model, constrained, writes a string until it is cut (a trained one ends it).
CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS: Any = [{"type": "function", "function": {**WEATHER["function"], "parameters": CITY}}, TIME]
ASK: Any = [{"role": "user", "content": "Weather in Paris, and the time in Tokyo?"}]


def schema_of(name: str) -> Any:
    return next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)


def check_calls(calls: Any, names: set[str]) -> None:
    """Each call names a declared function and its arguments are JSON matching that function's parameters."""
    assert calls, "no calls"
    for call in calls:
        assert call.type == "function" and call.id
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), schema_of(call.function.name))


# --- the library: each family's grammar and stream ------------------------------------------------------------


def family_tokenizers() -> dict[str, Any]:
    llama3 = template_tokenizer("llama3_1_json", "llama", LLAMA3_TOKENS)
    llama3.eos_token = "<|eot_id|>"
    return {
        "hermes": template_tokenizer("qwen2_5_hermes", "qwen2", ("<tool_call>", "</tool_call>")),
        "llama3_json": llama3,
        "mistral": template_tokenizer("mistral_v3", "llama", MISTRAL_TOKENS),
    }


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, Any]:
    return family_tokenizers()


def matcher(tokenizer: Any, grammar: str) -> Any:
    special = llguidance.LLMatcher.grammar_from_lark(grammar)
    compiled = llguidance.LLMatcher(llguidance.hf.from_tokenizer(tokenizer), special, log_level=0)
    assert not compiled.is_error(), compiled.get_error()
    return compiled


def accepts(tokenizer: Any, grammar: str, text: str) -> bool:
    m = matcher(tokenizer, grammar)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return all(m.consume_token(i) for i in ids) and m.is_accepting()


@pytest.mark.parametrize("fmt", ["hermes", "llama3_json", "mistral"])
def test_each_familys_grammar_takes_the_calls_its_template_writes_and_nothing_else(
    tokenizers: dict[str, Any], fmt: str
) -> None:
    tokenizer = tokenizers[fmt]
    special = special_tokens(tokenizer)
    functions = [t["function"] for t in TOOLS]
    one = {"id": "call00001", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    two = {
        "id": "call00002",
        "type": "function",
        "function": {"name": "get_time", "arguments": '{"zone": "JST", "hours_ahead": 0}'},
    }
    single = call_grammar(fmt, functions, parallel=False, special=special)
    parallel = call_grammar(fmt, functions, parallel=True, special=special)
    written = format_tool_calls(fmt, [one])
    if fmt == "mistral":  # the grammar leaves each call's id to the model; the template writes it after the call
        written = written.replace(', "id": "call00001"', "")
    assert accepts(tokenizer, single, written), written
    both = format_tool_calls(fmt, [one, two]).replace(', "id": "call00001"', "").replace(', "id": "call00002"', "")
    assert accepts(tokenizer, parallel, both)
    assert not accepts(tokenizer, single, both)  # one call only
    for wrong in [
        written.replace("get_weather", "get_wether"),  # not a declared function
        format_tool_calls(fmt, [{**two, "function": {"name": "get_time", "arguments": '{"zone": "PST"}'}}]),
        "The weather is fine.",  # text, where calls are required
    ]:
        assert not accepts(tokenizer, single, wrong.replace(', "id": "call00002"', "")), wrong
    # Calls, or content matching a schema (`auto` with a response format).
    either = call_grammar(
        fmt, functions, parallel=False, special=special, content={"type": "object"}, content_options={}
    )
    assert accepts(tokenizer, either, written)
    if fmt != "llama3_json":  # (a Llama 3.x call is itself a JSON object)
        assert accepts(tokenizer, either, '{"answer":"sunny"}')


@pytest.mark.parametrize(
    ("fmt", "answer", "content", "names"),
    [
        (
            "hermes",
            'Let me look.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>',
            "Let me look.\n",
            ["f"],
        ),
        (
            "hermes",
            "A <tool and a <tool_cal are not calls; <tool_call> broken",
            "A <tool and a <tool_cal are not calls; <tool_call> broken",
            [],
        ),
        ("hermes", "Plain text.", "Plain text.", []),
        ("llama3_json", '{"name": "f", "parameters": {"a": 1}}', "", ["f"]),
        ("llama3_json", '<|python_tag|>{"name": "f", "parameters": {}}', "", ["f"]),
        ("llama3_json", "Sunny {not a call}", "Sunny {not a call}", []),
        ("mistral", '[TOOL_CALLS] [{"name": "f", "arguments": {}}, {"name": "g", "arguments": {}}]', "", ["f", "g"]),
        ("mistral", "No calls [TOOL_", "No calls [TOOL_", []),
    ],
)
def test_a_streamed_answer_passes_text_on_and_holds_back_what_may_be_a_call(
    fmt: str, answer: str, content: str, names: list[str]
) -> None:
    for size in (1, 3, len(answer)):  # however the text comes, the same content and calls
        split = StreamedCalls(fmt)
        sent = "".join(split.feed(answer[at : at + size]) for at in range(0, len(answer), size))
        rest, calls = split.finish()
        assert (sent + rest, [c["function"]["name"] for c in calls]) == (content, names), size
        whole = parse_tool_calls(fmt, answer)
        assert [c["function"]["name"] for c in whole.tool_calls] == names  # as the answer read whole
    held = StreamedCalls("hermes")
    assert held.feed("Hi <tool_") == "Hi "  # the start of a marker waits until it is known
    assert held.feed("box>") == "<tool_box>"


# --- through the API ------------------------------------------------------------------------------------------


@pytest.fixture
def hermes(client: TestClient, tenant: Tenant, settings: Settings, tmp_path: Path) -> tuple[str, Path]:
    return register_hermes(settings, tenant, tmp_path, max_positions=2048)


@pytest.fixture
def hermes_model(hermes: tuple[str, Path]) -> str:
    return hermes[0]


@pytest.fixture
def openai(settings: Settings, tenant: Tenant, hermes_model: str) -> Iterator[OpenAI]:
    with live(create_app(settings)) as url:
        yield OpenAI(base_url=f"{url}/v1", api_key=tenant.key, max_retries=0)


@EMBEDDED
def test_required_and_named_tool_choices_are_answered_with_calls_that_parse_every_time(
    openai: OpenAI, hermes: tuple[str, Path]
) -> None:
    hermes_model, folder = hermes
    # Parallel calls: after each call the random model may start another or end; the end of turn made likelier
    # (a logit bias, which the grammar leaves no room for inside a call), it ends after a few.
    end_of_turn = AutoTokenizer.from_pretrained(str(folder)).convert_tokens_to_ids("<|im_end|>")
    required = openai.chat.completions.create(
        model=hermes_model,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        n=8,
        temperature=1.0,
        seed=3,
        logit_bias={str(end_of_turn): 2},
    )
    for choice in required.choices:
        assert choice.finish_reason == "tool_calls", choice.message.content
        assert choice.message.content is None and choice.message.refusal is None
        check_calls(choice.message.tool_calls, {"get_weather", "get_time"})
    assert max(len(c.message.tool_calls or []) for c in required.choices) > 1  # several calls in one answer

    named = openai.chat.completions.create(
        model=hermes_model,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        n=8,
        temperature=1.0,
    )
    for choice in named.choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
        check_calls(choice.message.tool_calls, {"get_time"})
    ids = [c.message.tool_calls[0].id for c in named.choices if c.message.tool_calls]
    assert len(set(ids)) == len(ids)  # each call its own id

    # Without parallel calls, one call an answer, which ends it.
    single = openai.chat.completions.create(
        model=hermes_model, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, n=8
    )
    for choice in single.choices:
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls or []) == 1
        check_calls(choice.message.tool_calls, {"get_weather", "get_time"})


@EMBEDDED
def test_tool_calls_stream_as_openai_streams_them(openai: OpenAI, hermes_model: str) -> None:
    asked: Any = {"model": hermes_model, "messages": ASK, "tools": TOOLS, "tool_choice": "required", "seed": 11}
    whole = openai.chat.completions.create(**asked, temperature=1.0)
    chunks = list(openai.chat.completions.create(**asked, temperature=1.0, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(not d.content for d in deltas)  # calls only: no text
    firsts = [t for d in deltas for t in d.tool_calls or [] if t.id is not None]
    assert [t.index for t in firsts] == list(range(len(firsts)))  # id, type and name first, in order
    assert all(t.type == "function" and t.function and t.function.name for t in firsts)
    # The client's own accumulator puts the deltas together: the same calls as the whole answer (same seed).
    with openai.chat.completions.stream(**asked, temperature=1.0) as stream:
        final = stream.get_final_completion()
    assert whole.choices[0].message.tool_calls is not None
    made = [(c.function.name, c.function.arguments) for c in final.choices[0].message.tool_calls or []]
    assert made == [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls]
    assert final.choices[0].finish_reason == "tool_calls"


@EMBEDDED
def test_auto_none_and_a_conversation_with_calls_and_results(
    openai: OpenAI, hermes_model: str, client: TestClient, tenant: Tenant
) -> None:
    # `auto` (the default with tools): the untrained model answers in text, which stays text, with no tool_calls.
    auto = client.post(
        "/v1/chat/completions",
        headers=tenant.headers,
        json={"model": hermes_model, "messages": ASK, "tools": TOOLS, "max_completion_tokens": 8, "seed": 1},
    )
    assert auto.status_code == 200, auto.text
    message = auto.json()["choices"][0]["message"]
    if "tool_calls" not in message:  # absent, not null, as OpenAI answers text
        assert isinstance(message["content"], str)
        assert auto.json()["choices"][0]["finish_reason"] in ("stop", "length")
    # `none`: the tools are in the prompt, the answer is text.
    plain = openai.chat.completions.create(model=hermes_model, messages=ASK, max_completion_tokens=8, seed=1)
    none = openai.chat.completions.create(
        model=hermes_model, messages=ASK, tools=TOOLS, tool_choice="none", max_completion_tokens=8, seed=1
    )
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason in ("stop", "length")
    assert none.usage is not None and plain.usage is not None
    assert none.usage.prompt_tokens > plain.usage.prompt_tokens + 50  # the two functions' definitions

    # A conversation that made calls and got results goes on: the calls and results are rendered.
    first = openai.chat.completions.create(model=hermes_model, messages=ASK, tools=TOOLS, tool_choice="required")
    calls = first.choices[0].message.tool_calls or []
    conversation: Any = [
        *ASK,
        first.choices[0].message,  # sent back as the client received it
        *[{"role": "tool", "tool_call_id": c.id, "content": "sunny, 14:05"} for c in calls],
    ]
    later = openai.chat.completions.create(
        model=hermes_model, messages=conversation, tools=TOOLS, max_completion_tokens=4
    )
    assert later.usage is not None and later.usage.prompt_tokens > none.usage.prompt_tokens
    # A response format with `auto`: calls, or JSON content matching it.
    person = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}
    either = openai.chat.completions.create(
        model=hermes_model,
        messages=ASK,
        tools=TOOLS,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": person}},
        n=4,
        temperature=1.0,
        max_completion_tokens=120,
    )
    for choice in either.choices:
        if choice.message.tool_calls:
            check_calls(choice.message.tool_calls, {"get_weather", "get_time"})
        elif choice.finish_reason == "stop":
            jsonschema.validate(json.loads(choice.message.content or ""), person)


def refusal(openai: OpenAI, **asked: Any) -> dict[str, Any]:
    with pytest.raises(UnprocessableEntityError) as refused:
        openai.chat.completions.create(**{"messages": ASK, **asked})
    body = refused.value.body
    assert isinstance(body, dict)
    return body


@EMBEDDED
def test_each_tool_refusal_is_a_422_naming_its_field(openai: OpenAI, hermes_model: str) -> None:
    m = hermes_model
    no_support = refusal(openai, model="tiny-random-llama", tools=TOOLS)
    assert (no_support["code"], no_support["param"]) == ("no_tool_support", "tools")
    assert "tiny-random-llama has no tool support" in no_support["message"]
    named = refusal(openai, model=m, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_tide"}})
    assert named["message"] == "tool_choice: 'get_tide' is not one of the tools"
    assert named["param"] == "tool_choice"
    assert "needs tools" in refusal(openai, model=m, tool_choice="required")["message"]
    bad_name = {"type": "function", "function": {"name": "get weather"}}
    assert refusal(openai, model=m, tools=[bad_name])["param"] == "tools.0.function.name"
    assert refusal(openai, model=m, tools=[WEATHER] * 129)["param"] == "tools"
    twice = refusal(openai, model=m, tools=[WEATHER, WEATHER])
    assert twice["message"] == 'tools[1].function.name: "get_weather" is declared twice'
    assert twice["param"] == "tools[1].function.name"
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"'}}
    said = {"role": "assistant", "content": None, "tool_calls": [call]}
    broken = refusal(
        openai, model=m, tools=TOOLS, messages=[*ASK, said, {"role": "tool", "tool_call_id": "c1", "content": "x"}]
    )
    assert broken["message"].startswith("messages[1].tool_calls[0].function.arguments: not valid JSON")
    assert broken["param"] == "messages[1].tool_calls[0].function.arguments"
    stray = refusal(
        openai, model=m, tools=TOOLS, messages=[*ASK, {"role": "tool", "tool_call_id": "c9", "content": "x"}]
    )
    assert '"c9" answers no unanswered call' in stray["message"]
    no_id = refusal(openai, model=m, tools=TOOLS, messages=[*ASK, {"role": "tool", "content": "x"}])
    assert "tool_call_id" in no_id["message"]
    functions = refusal(openai, model=m, functions=[WEATHER["function"]])
    assert functions["param"] == "functions"
    unsupported = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "if": {}}}}
    compiled = refusal(openai, model=m, tools=[unsupported], tool_choice="required")
    assert (compiled["code"], compiled["param"]) == ("unsupported_schema", "tools")
