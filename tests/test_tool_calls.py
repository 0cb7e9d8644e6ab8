"""Tool calling in the library: each family's format detected from its chat template, written and parsed back;
OpenAI's training lines rendered through tool-capable templates with the loss on the assistant turns (their tool
calls included) and nothing else — not the declared tools, the tools' results, the prompt or `"weight": 0` turns."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app.ml.formatting import IGNORE_INDEX, encode_record
from app.ml.models import BUILTINS, ModelStore
from app.ml.tool_calls import (
    chat_inputs,
    detect_tool_call_format,
    format_tool_calls,
    parse_tool_calls,
    renders_tool_calls,
    template_id,
)
from tests.model_factories import build_tokenizer

TEMPLATES = Path(__file__).parent / "chat_templates"
LLAMA3_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>")
MISTRAL_TOKENS = (
    "[INST]",
    "[/INST]",
    "[TOOL_CALLS]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
)


def template_tokenizer(template: str, arch: str, special: tuple[str, ...] = ()) -> Any:
    """A tiny tokenizer of `arch`'s family with the family's control tokens and a tool-capable chat template."""
    tokenizer = build_tokenizer(arch)
    if special:
        tokenizer.add_tokens(list(special), special_tokens=True)
    tokenizer.chat_template = (TEMPLATES / f"{template}.jinja").read_text()
    return tokenizer


@pytest.fixture(scope="module")
def hermes() -> Any:
    return template_tokenizer("qwen2_5_hermes", "qwen2", ("<tool_call>", "</tool_call>"))


@pytest.fixture(scope="module")
def llama3() -> Any:
    tokenizer = template_tokenizer("llama3_1_json", "llama", LLAMA3_TOKENS)
    tokenizer.bos_token = "<|begin_of_text|>"
    tokenizer.eos_token = "<|eot_id|>"
    return tokenizer


@pytest.fixture(scope="module")
def mistral() -> Any:
    return template_tokenizer("mistral_v3", "llama", MISTRAL_TOKENS)


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def call(call_id: str, city: str) -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
    }


def trained_text(tokenizer: Any, record: dict[str, Any]) -> str:
    example = encode_record(tokenizer, record)
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(*chat_inputs(record), tokenize=False)
    return str(
        tokenizer.decode(
            [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
        )
    )


def untrained_text(tokenizer: Any, record: dict[str, Any]) -> str:
    example = encode_record(tokenizer, record)
    return str(
        tokenizer.decode(
            [t for t, label in zip(example.input_ids, example.labels, strict=True) if label == IGNORE_INDEX]
        )
    )


# --- detection --------------------------------------------------------------------------------------------------


def test_each_family_is_detected_from_its_chat_template(hermes: Any, llama3: Any, mistral: Any) -> None:
    assert detect_tool_call_format(hermes) == "hermes"
    assert detect_tool_call_format(llama3) == "llama3_json"
    assert detect_tool_call_format(mistral) == "mistral"


def test_templates_without_tool_support_have_no_format(model_cache_dir: Path) -> None:
    smollm2 = ModelStore(model_cache_dir, None).tokenizer(BUILTINS["tiny-random-llama"])  # SmolLM2's template
    chatml = build_tokenizer("qwen2")  # role and content only
    no_template = build_tokenizer("qwen2", chat_template=False)
    for tokenizer in (smollm2, chatml, no_template):
        assert detect_tool_call_format(tokenizer) is None
        assert not renders_tool_calls(tokenizer)


def test_a_llama3_template_whose_end_of_turn_is_no_token_renders_tools_but_is_not_detected() -> None:
    """Where the tokenizer does not know the template's end-of-turn marker, the call's end cannot be told: the
    operator names the format (`--tool-call-format`)."""
    tokenizer = template_tokenizer("llama3_1_json", "llama")
    assert renders_tool_calls(tokenizer)
    assert detect_tool_call_format(tokenizer) is None


# --- each family's text -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["hermes", "llama3_json", "mistral"])
def test_what_a_family_writes_parses_back_into_openai_tool_calls(fmt: str) -> None:
    calls = [call("call_paris", "Paris"), call("call_rome", "Rome")]
    text = format_tool_calls(fmt, calls)
    parsed = parse_tool_calls(fmt, text)
    assert parsed.content is None
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.tool_calls] == [
        ("function", "get_weather", {"city": "Paris"}),
        ("function", "get_weather", {"city": "Rome"}),
    ]
    ids = [c["id"] for c in parsed.tool_calls]
    assert len(set(ids)) == 2 and all(ids)
    if fmt == "mistral":  # Mistral writes the ids, as nine letters and digits
        assert ids == [template_id("call_paris"), template_id("call_rome")]


def test_hermes_output_with_text_before_the_calls_and_no_closing_tag() -> None:
    text = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
    parsed = parse_tool_calls("hermes", text)
    assert parsed.content == "Let me look."
    assert [json.loads(c["function"]["arguments"]) for c in parsed.tool_calls] == [{"city": "Oslo"}]
    assert parsed.tool_calls[0]["id"].startswith("call_")


def test_llama3_output_with_the_python_tag_and_two_calls() -> None:
    text = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "t", "parameters": {}}'
    parsed = parse_tool_calls("llama3_json", text)
    assert parsed.content is None
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in parsed.tool_calls] == [
        ("get_weather", '{"city": "Oslo"}'),
        ("t", "{}"),
    ]


def test_mistral_output_keeps_its_ids_and_text_before_the_calls() -> None:
    text = 'Checking. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}, "id": "a1b2c3d4e"}]'
    parsed = parse_tool_calls("mistral", text)
    assert parsed.content == "Checking."
    assert parsed.tool_calls == [
        {"id": "a1b2c3d4e", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    ]


@pytest.mark.parametrize(
    ("fmt", "text"),
    [
        ("hermes", "The weather is fine."),
        ("hermes", "<tool_call>\n{not json}\n</tool_call>"),
        ("hermes", '<tool_call>{"name": "f", "arguments": [1]}</tool_call>'),
        ("hermes", '<tool_call>{"name": "f", "arguments": {}}</tool_call> and then some text'),
        ("llama3_json", '{"city": "Oslo"}'),
        ("llama3_json", '{"name": "f", "parameters": {}} is what I would call'),
        ("llama3_json", "Sunny."),
        ("mistral", "[TOOL_CALLS] not a list"),
        ("mistral", '[TOOL_CALLS] [{"arguments": {}}]'),
    ],
)
def test_text_that_is_not_well_formed_calls_stays_text(fmt: str, text: str) -> None:
    parsed = parse_tool_calls(fmt, text)
    assert parsed.tool_calls == [] and parsed.content == text


# --- rendering and the loss mask ----------------------------------------------------------------------------------

PARALLEL = {
    "tools": [WEATHER_TOOL],
    "parallel_tool_calls": True,
    "messages": [
        {"role": "system", "content": "You answer about the weather."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [call("call_p", "Paris"), call("call_r", "Rome")]},
        {"role": "tool", "tool_call_id": "call_p", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_r", "content": "rainy"},
        {"role": "assistant", "content": "Sunny in Paris, rainy in Rome."},
    ],
}


def test_hermes_loss_covers_the_serialized_calls_and_answers_and_nothing_else(hermes: Any) -> None:
    assert trained_text(hermes, PARALLEL) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>\n'
        "Sunny in Paris, rainy in Rome.<|im_end|>\n"
    )
    context = untrained_text(hermes, PARALLEL)
    assert context == (
        "<|im_start|>system\nYou answer about the weather.\n\n# Tools\n\n<tools>\n"
        + json.dumps(WEATHER_TOOL)
        + "\n</tools>\n\nCall functions in <tool_call></tool_call> tags.<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n<|im_start|>assistant\n"
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrainy\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_tool_call_turn_with_weight_0_is_context_not_trained_on(hermes: Any) -> None:
    record = json.loads(json.dumps(PARALLEL))
    record["messages"][2]["weight"] = 0
    assert trained_text(hermes, record) == "Sunny in Paris, rainy in Rome.<|im_end|>\n"
    assert '"city": "Rome"' in untrained_text(hermes, record)


def test_legacy_functions_render_as_tool_calls(hermes: Any) -> None:
    record = {
        "functions": [WEATHER_TOOL["function"]],
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "function_call": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
            {"role": "function", "name": "get_weather", "content": "snow"},
            {"role": "assistant", "content": "Snow in Oslo."},
        ],
    }
    assert trained_text(hermes, record) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>\n'
        "Snow in Oslo.<|im_end|>\n"
    )
    assert "<tool_response>\nsnow\n</tool_response>" in untrained_text(hermes, record)
    messages, tools = chat_inputs(record)
    assert tools == [WEATHER_TOOL]
    assert messages[2]["role"] == "tool" and messages[2]["tool_call_id"] == messages[1]["tool_calls"][0]["id"]


def test_llama3_loss_covers_the_json_call_and_the_answer(llama3: Any) -> None:
    record = {
        "tools": [WEATHER_TOOL],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "tool_calls": [call("call_p", "Paris")]},
            {"role": "tool", "tool_call_id": "call_p", "content": "sunny"},
            {"role": "assistant", "content": "It is sunny in Paris."},
        ],
    }
    assert trained_text(llama3, record) == (
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>It is sunny in Paris.<|eot_id|>'
    )
    assert "<|start_header_id|>ipython<|end_header_id|>\n\nsunny<|eot_id|>" in untrained_text(llama3, record)


def test_mistral_turns_are_found_though_its_template_moves_tools_and_system_to_the_last_user_message(
    mistral: Any,
) -> None:
    record = {
        "tools": [WEATHER_TOOL],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "OK", "weight": 0},
            {"role": "user", "content": "Hi again"},
            {"role": "assistant", "content": "OK"},  # the same text as the untrained turn: not taken for it
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "tool_calls": [call("call_p", "Paris")]},
            {"role": "tool", "tool_call_id": "call_p", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."},
        ],
    }
    call_id = template_id("call_p")
    assert trained_text(mistral, record) == (
        " OK</s>"
        f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {{"city": "Paris"}}, "id": "{call_id}"}}]</s>'
        " Sunny.</s>"
    )
    context = untrained_text(mistral, record)
    assert context.startswith("<s>[INST] Hi[/INST] OK</s>[INST] Hi again[/INST][AVAILABLE_TOOLS] [")
    assert context.endswith(
        f'[INST] Weather in Paris?[/INST][TOOL_RESULTS] {{"content": sunny, "call_id": "{call_id}"}}[/TOOL_RESULTS]'
    )
