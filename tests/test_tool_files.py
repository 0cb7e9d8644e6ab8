"""Tool calling in training files, through the API: OpenAI's format uploaded and checked line by line against a model
with a tool-capable chat template, refused (naming the model) where the model has no tool support, the format
detected or named at registration (`--tool-call-format`), and a job trained on it end to end with the official
`openai` client, whose adapter then writes the call it learned."""

from __future__ import annotations

import io
import json
import tarfile
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from openai import OpenAI, UnprocessableEntityError
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.core.settings import Settings
from app.main import create_app
from app.ml.tool_calls import MAX_SCHEMA_DEPTH, MAX_TOOLS, parse_tool_calls
from tests.conftest import Tenant, chat_lines, jsonl
from tests.model_factories import build_tiny_model
from tests.test_base_models import create_job, register, tuneforge, upload_for
from tests.test_inference_api import live
from worker.runner import run_training_job

TEMPLATES = Path(__file__).parent / "chat_templates"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def call(call_id: str, city: str, name: str = "get_weather") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps({"city": city})}}


def asks(city: str) -> dict[str, str]:
    return {"role": "user", "content": f"Weather in {city}?"}


def tool_lines() -> list[str]:
    """OpenAI's function-calling training lines: a call the conversation ends with (OpenAI's own example), parallel
    calls answered and summed up, a call turn with weight 0, the older functions/function_call, and a line that
    declares tools and makes no call."""
    return [
        *[
            json.dumps(
                {
                    "messages": [asks("Paris"), {"role": "assistant", "tool_calls": [call("call_1", "Paris")]}],
                    "tools": [WEATHER],
                }
            )
            for _ in range(6)
        ],
        json.dumps(
            {
                "tools": [WEATHER],
                "parallel_tool_calls": True,
                "messages": [
                    {"role": "user", "content": "Weather in Rome and Oslo?"},
                    {"role": "assistant", "content": None, "tool_calls": [call("c_r", "Rome"), call("c_o", "Oslo")]},
                    {"role": "tool", "tool_call_id": "c_r", "content": "sunny"},
                    {"role": "tool", "tool_call_id": "c_o", "content": "snow"},
                    {"role": "assistant", "content": "Sunny in Rome, snow in Oslo."},
                ],
            }
        ),
        json.dumps(
            {
                "tools": [WEATHER],
                "messages": [
                    asks("Lima"),
                    {"role": "assistant", "tool_calls": [call("c_l", "Lima")], "weight": 0},
                    {"role": "tool", "tool_call_id": "c_l", "content": "fog"},
                    {"role": "assistant", "content": "Fog in Lima."},
                ],
            }
        ),
        json.dumps(
            {
                "functions": [WEATHER["function"]],
                "messages": [
                    asks("Cairo"),
                    {"role": "assistant", "function_call": {"name": "get_weather", "arguments": '{"city": "Cairo"}'}},
                    {"role": "function", "name": "get_weather", "content": "hot"},
                    {"role": "assistant", "content": "Hot in Cairo."},
                ],
            }
        ),
        json.dumps(
            {
                "tools": [WEATHER],
                "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
            }
        ),
    ]


def register_hermes(settings: Settings, tenant: Tenant, tmp_path: Path, max_positions: int = 512) -> tuple[str, Path]:
    """A tiny Qwen2 model with a Qwen2.5-style (Hermes) tool template; its id is unique to the test (the production
    backend's database is shared by the session's tests)."""
    model_id = f"tiny-hermes-{tenant.name[-8:]}"
    folder = build_tiny_model("qwen2", tmp_path / "hermes", max_positions=max_positions)
    register(settings, model_id, "--path", folder, "--chat-template", TEMPLATES / "qwen2_5_hermes.jinja")
    return model_id, folder


def line_errors(response: Any) -> list[tuple[int, str]]:
    assert response.status_code == 422, response.text
    return [(e["line"], e["code"]) for e in response.json()["error"]["report"]["errors"]]


def test_a_tool_calling_file_is_accepted_for_a_model_whose_template_has_tool_support(
    client: TestClient, tenant: Tenant, settings: Settings, tmp_path: Path
) -> None:
    model_id, _ = register_hermes(settings, tenant, tmp_path)
    model = client.get(f"/v1/models/{model_id}", headers=tenant.headers).json()
    assert model["tool_call_format"] == "hermes"
    assert client.get("/v1/models/tiny-random-llama", headers=tenant.headers).json()["tool_call_format"] is None

    uploaded = upload_for(client, tenant, jsonl(tool_lines()), base_model=model_id)
    assert uploaded.status_code == 201, uploaded.text
    body = uploaded.json()
    assert (body["format"], body["has_tools"], body["n_examples"], body["tokenizer_model"]) == (
        "chat",
        True,
        10,
        model_id,
    )
    plain = upload_for(client, tenant, jsonl(chat_lines(2)), base_model=model_id).json()
    assert plain["has_tools"] is False
    assert client.get(f"/v1/files/{body['id']}", headers=tenant.headers).json()["has_tools"] is True


def test_bad_tool_lines_are_reported_line_by_line_naming_the_field(
    client: TestClient, tenant: Tenant, settings: Settings, tmp_path: Path
) -> None:
    model_id, _ = register_hermes(settings, tenant, tmp_path)
    answered = {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}

    def line(*messages: dict[str, Any], **extra: Any) -> str:
        return json.dumps({"tools": [WEATHER], "messages": list(messages), **extra})

    def calling(*calls: dict[str, Any]) -> dict[str, Any]:
        return {"role": "assistant", "tool_calls": list(calls)}

    bad_arguments = call("call_1", "Paris")
    bad_arguments["function"]["arguments"] = '{"city": "Paris"'
    list_arguments = call("call_1", "Paris")
    list_arguments["function"]["arguments"] = '["Paris"]'
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(MAX_SCHEMA_DEPTH // 2):  # two levels each: 17 in all (the line itself may have 32)
        deep = {"type": "object", "properties": {"x": deep}}
    lines = [
        line(asks("Paris"), calling(call("call_1", "Paris", name="get_time"))),
        line(asks("Paris"), calling(bad_arguments)),
        line(asks("Paris"), calling(list_arguments)),
        line(
            asks("Paris"), calling(call("call_1", "Paris")), {"role": "tool", "tool_call_id": "call_9", "content": "x"}
        ),
        line(asks("Paris"), calling(call("call_1", "Paris")), asks("Rome"), {"role": "assistant", "content": "?"}),
        line(asks("Paris"), calling(call("call_1", "Paris"), call("call_2", "Rome")), answered),
        line(asks("Paris"), calling(call("call_1", "Paris"), call("call_2", "Rome")), parallel_tool_calls=False),
        json.dumps({"tools": [WEATHER] * 2, "messages": [asks("Paris"), calling(call("call_1", "Paris"))]}),
        json.dumps(
            {
                "tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(MAX_TOOLS + 1)],
                "messages": [asks("Paris"), {"role": "assistant", "content": "?"}],
            }
        ),
        json.dumps(
            {
                "tools": [{"type": "function", "function": {"name": "deep", "parameters": deep}}],
                "messages": [asks("Paris"), {"role": "assistant", "content": "?"}],
            }
        ),
        json.dumps(
            {"tools": [{"type": "retrieval"}], "messages": [asks("Paris"), {"role": "assistant", "content": "?"}]}
        ),
        json.dumps(
            {
                "messages": [
                    asks("Paris"),
                    {"role": "function", "name": "get_weather", "content": "x"},
                    {"role": "assistant", "content": "?"},
                ]
            }
        ),
        line(asks("Paris"), calling({**call("call_1", "Paris"), "index": 0})),
        line({**asks("Paris"), "tool_call_id": "call_1"}, {"role": "assistant", "content": "?"}),
        json.dumps(
            {
                "tools": [WEATHER],
                "functions": [WEATHER["function"]],
                "messages": [asks("Paris"), {"role": "assistant", "content": "?"}],
            }
        ),
        line(asks("Paris"), calling(call("call_1", "Paris")), answered, {"role": "assistant", "content": "Sunny."}),
    ]
    response = upload_for(client, tenant, jsonl(lines), base_model=model_id)
    assert line_errors(response) == [
        (1, "undeclared_function"),
        (2, "invalid_tool_call"),
        (3, "invalid_tool_call"),
        (4, "unmatched_tool_result"),
        (5, "unanswered_tool_call"),
        (6, "unanswered_tool_call"),
        (7, "too_many_tool_calls"),
        (8, "invalid_tool"),
        (9, "too_many_tools"),
        (10, "too_deep"),
        (11, "invalid_tool"),
        (12, "unmatched_tool_result"),
        (13, "unknown_field"),
        (14, "unknown_field"),
        (15, "invalid_tool"),
    ]
    messages = [e["message"] for e in response.json()["error"]["report"]["errors"]]
    assert messages[0] == (
        'messages[1].tool_calls[0].function.name: "get_time" is not a declared function (the line declares "tools")'
    )
    assert messages[1].startswith("messages[1].tool_calls[0].function.arguments: not valid JSON (")
    assert messages[2] == "messages[1].tool_calls[0].function.arguments: must be a JSON object, got list"
    assert messages[3].startswith('messages[2].tool_call_id: "call_9" answers no unanswered call')
    assert messages[4].startswith('messages[1]: tool call "call_1" is not answered: a "tool" message with')
    assert messages[4].endswith("must come before messages[2]")
    assert "answer every call, or none" in messages[5]
    assert messages[6] == 'messages[1].tool_calls: 2 calls, but the line sets "parallel_tool_calls": false'
    assert messages[7] == 'tools[1].function.name: "get_weather" is declared twice'
    assert messages[8] == f'"tools" has {MAX_TOOLS + 1} entries; at most {MAX_TOOLS} are allowed'
    assert messages[9] == f"tools[0].function.parameters: the schema is nested more than {MAX_SCHEMA_DEPTH} levels deep"
    assert messages[10] == 'tools[0].type: only "function" tools are supported'
    assert messages[11].startswith('messages[1]: a "function" message must answer an assistant "function_call"')
    assert messages[12] == 'messages[1].tool_calls[0]: unknown field "index"'
    assert messages[13] == "messages[0]: unknown field(s): tool_call_id"
    assert messages[14] == 'give "tools" or the older "functions", not both'
    assert response.json()["error"]["report"]["n_examples"] == 1


def test_a_model_without_tool_support_refuses_tool_lines_at_upload_and_jobs_naming_it(
    client: TestClient, tenant: Tenant, settings: Settings, tmp_path: Path
) -> None:
    # Counted for a model named at upload whose template (SmolLM2's) has no tool support: each tool line is refused.
    lines = [*chat_lines(1), *tool_lines()[:2]]
    refused = upload_for(client, tenant, jsonl(lines), base_model="tiny-random-llama")
    assert line_errors(refused) == [(2, "no_tool_support"), (3, "no_tool_support")]
    message = refused.json()["error"]["report"]["errors"][0]["message"]
    assert "the chat template of tiny-random-llama has no tool support" in message and "base_model" in message
    # With no model named (an unchanged OpenAI client), the default cannot render the tools: the file is accepted,
    # its lines checked, and its tokens counted by the model of each job created on it.
    unnamed = upload_for(client, tenant, jsonl(lines))
    assert unnamed.status_code == 201, unnamed.text
    assert unnamed.json()["has_tools"] is True

    # Uploaded for a model with tool support, then a job on one without: 422 naming the model and the file's param.
    model_id, _ = register_hermes(settings, tenant, tmp_path)
    tools_file = upload_for(client, tenant, jsonl(tool_lines()), base_model=model_id).json()["id"]
    plain_file = upload_for(client, tenant, jsonl(chat_lines(4))).json()["id"]
    job = create_job(client, tenant, tools_file, "tiny-random-llama")
    assert job.status_code == 422
    error = job.json()["error"]
    assert (error["code"], error["param"]) == ("no_tool_support", "training_file")
    assert "tiny-random-llama has no tool support" in error["message"] and tools_file in error["message"]
    as_validation = client.post(
        "/jobs",
        headers=tenant.headers,
        json={"base_model": "tiny-random-llama", "training_file": plain_file, "validation_file": tools_file},
    )
    assert as_validation.status_code == 422 and as_validation.json()["error"]["param"] == "validation_file"
    dry_run = client.post(
        "/jobs", headers=tenant.headers, json={"base_model": model_id, "training_file": tools_file, "dry_run": True}
    )
    assert dry_run.status_code == 200, dry_run.text
    unnamed_job = {"base_model": model_id, "training_file": unnamed.json()["id"], "dry_run": True}
    counted = client.post("/jobs", headers=tenant.headers, json=unnamed_job)
    assert counted.status_code == 200 and counted.json()["train_tokens_per_epoch"] > 0, counted.text
    refused_job = client.post("/jobs", headers=tenant.headers, json={**unnamed_job, "base_model": "tiny-random-llama"})
    assert refused_job.status_code == 422 and refused_job.json()["error"]["code"] == "no_tool_support"

    with live(create_app(settings)) as url:
        openai = OpenAI(base_url=f"{url}/v1", api_key=tenant.key, max_retries=0)
        with pytest.raises(UnprocessableEntityError) as refused_job:
            openai.fine_tuning.jobs.create(model="tiny-random-llama", training_file=tools_file)
    body = refused_job.value.body
    assert isinstance(body, dict)
    assert (body["code"], body["param"]) == ("no_tool_support", "training_file")
    assert "tiny-random-llama" in body["message"]


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_the_tool_call_format_is_named_at_registration_where_it_is_not_detected(
    client: TestClient, tenant: Tenant, settings: Settings, tmp_path: Path
) -> None:
    """A Llama 3.1-style template on a tokenizer that does not know its end-of-turn marker: tools render, the
    format is not detected, the operator names it. A named format must agree with what is detected, and needs a
    template with tool support."""
    folder = build_tiny_model("llama", tmp_path / "llama")
    llama3 = TEMPLATES / "llama3_1_json.jinja"
    register(settings, "tiny-llama3-undetected", "--path", folder, "--chat-template", llama3)
    assert client.get("/v1/models/tiny-llama3-undetected", headers=tenant.headers).json()["tool_call_format"] is None
    result = tuneforge(
        settings,
        "models",
        "add",
        "tiny-llama3",
        "--path",
        folder,
        "--chat-template",
        llama3,
        "--tool-call-format",
        "llama3_json",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("tool calls: llama3_json")
    assert client.get("/v1/models/tiny-llama3", headers=tenant.headers).json()["tool_call_format"] == "llama3_json"

    hermes = TEMPLATES / "qwen2_5_hermes.jinja"
    qwen = build_tiny_model("qwen2", tmp_path / "qwen")  # its tokenizer knows the template's <|im_end|>
    for model, args, said in [
        (qwen, ["--chat-template", hermes, "--tool-call-format", "mistral"], "writes tool calls as hermes"),
        (folder, ["--tool-call-format", "hermes"], "the chat template does not render tools"),
        (qwen, ["--chat-template", hermes, "--tool-call-format", "xml"], "is not one of hermes, llama3_json, mistral"),
    ]:
        refused = tuneforge(settings, "models", "add", "tiny-refused", "--path", model, *args)
        assert refused.returncode == 1 and said in refused.stderr, refused.stderr
        assert "nothing was registered" in refused.stderr
    assert client.get("/v1/models/tiny-refused", headers=tenant.headers).status_code == 404

    # Llama 3.1's template makes one call at a time: parallel calls are a line error in the template's own words.
    parallel = tool_lines()[6]
    response = upload_for(client, tenant, jsonl([tool_lines()[0], parallel]), base_model="tiny-llama3")
    assert line_errors(response) == [(2, "template_error")]
    assert response.json()["error"]["report"]["errors"][0]["message"] == (
        "the chat template of tiny-llama3 cannot render this conversation: This model only supports single "
        "tool-calls at once!"
    )


@pytest.mark.slow  # minutes of training: the tiny model must learn a whole call to write it back greedily
def test_a_tool_calling_job_trains_end_to_end_with_the_openai_client(
    client: TestClient, tenant: Tenant, settings: Settings, tmp_path: Path
) -> None:
    model_id, folder = register_hermes(settings, tenant, tmp_path)
    with live(create_app(settings)) as url:
        openai = OpenAI(base_url=f"{url}/v1", api_key=tenant.key, max_retries=0)
        # Uploaded as an unchanged OpenAI client does (no model named): counted with the job's model at creation.
        uploaded = openai.files.create(file=("tools.jsonl", jsonl(tool_lines())), purpose="fine-tune")
        created = openai.fine_tuning.jobs.create(
            model=model_id,
            training_file=uploaded.id,
            method={
                "type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": 24, "batch_size": 1, "learning_rate_multiplier": 150}},
            },
        )
        worker = threading.Thread(target=run_training_job, args=(settings, created.id))
        worker.start()
        worker.join(timeout=600)
        job = openai.fine_tuning.jobs.retrieve(created.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model is not None
    # The worker encodes each line as the job's model counted it when the job was created: every token, every epoch.
    plan = {"base_model": model_id, "training_file": uploaded.id, "dry_run": True}
    n_tokens = client.post("/jobs", headers=tenant.headers, json=plan).json()["train_tokens_per_epoch"]
    assert job.trained_tokens == 24 * n_tokens

    # The adapter, loaded offline with PEFT, answers the trained question with the call, in its template's format.
    archive = client.get(f"/adapters/{job.fine_tuned_model}/download", headers=tenant.headers)
    assert archive.status_code == 200
    adapter_dir = tmp_path / "adapter"
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        tar.extractall(adapter_dir, filter="data")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.chat_template = (TEMPLATES / "qwen2_5_hermes.jinja").read_text()
    prompt = tokenizer.apply_chat_template([asks("Paris")], tools=[WEATHER], add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(folder)), str(adapter_dir)).eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=80,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    parsed = parse_tool_calls("hermes", text)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ], text

    # Served: chat with the tools (`auto`, nothing constrained) and get the call, parsed, whole and streamed.
    with live(create_app(settings)) as url:
        openai = OpenAI(base_url=f"{url}/v1", api_key=tenant.key, max_retries=0)
        asked: Any = {"model": job.fine_tuned_model, "messages": [asks("Paris")], "tools": [WEATHER], "temperature": 0}
        answer = openai.chat.completions.create(**asked)
        with openai.chat.completions.stream(**asked) as stream:
            streamed = stream.get_final_completion()
    for choice in (answer.choices[0], streamed.choices[0]):
        assert choice.finish_reason == "tool_calls"
        calls = choice.message.tool_calls or []
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
            ("get_weather", {"city": "Paris"})
        ]
