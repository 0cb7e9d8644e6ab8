"""Every response of Tuneforge's OpenAI-compatible routes, as sent on the wire, validates against OpenAI's published
OpenAPI schemas (tests/openai_schema/components.json, extracted from github.com/openai/openai-openapi by
tests/openai_schema/extract.py): files, models, fine-tuning jobs (supervised, DPO continuing from an adapter,
paused, cancelled), their events and checkpoints, chat completions (text, logprobs, structured outputs, tool
calls) and their streamed chunks, completions, and errors. (Webhook payloads are checked in test_webhooks.)"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator

from app.core.settings import Settings
from app.main import create_app
from tests.conftest import Tenant, live
from tests.test_dpo_jobs import colour_lines, preference_file
from tests.test_fine_tuning_api import fruit_file
from tests.test_tool_files import register_hermes
from tests.test_tool_inference import ASK, TOOLS
from worker.runner import run_training_job

pytestmark = pytest.mark.parametrize("backend", ["embedded"], indirect=True)

COMPONENTS = json.loads((Path(__file__).parent / "openai_schema" / "components.json").read_text())["schemas"]


# Where OpenAI's published schemas disagree with what OpenAI's API itself sends (and the official clients read),
# the API is followed, here and nowhere else: streamed completion chunks carry `"finish_reason": null` until the
# last (the spec reuses the whole response's schema for them), and a paused job's status is "paused" (the spec's own
# example for the pause route), which the status enum does not list. Evals: a run without an error, and an output
# item's sample without one, carry `"error": null` (the spec's own examples); and a run's `input_messages` template
# cannot satisfy the spec's `oneOf`, as any message with text content matches both of its choices (EasyInputMessage
# and EvalItem). (`*`: any list index; None: whatever the value.)
PUBLISHED_GAPS = {
    ("CreateCompletionResponse", "choices/*/finish_reason", "null"),
    ("FineTuningJob", "status", '"paused"'),
    ("EvalRun", "error", "null"),
    ("EvalRunList", "data/*/error", "null"),
    ("EvalRunOutputItem", "sample/error", "null"),
    ("EvalRunOutputItemList", "data/*/sample/error", "null"),
    ("EvalRun", "data_source", None),
    ("EvalRunList", "data/*/data_source", None),
}


def published_gap(name: str, path: str, instance: Any) -> bool:
    path = re.sub(r"(^|/)\d+(?=/|$)", r"\1*", path)
    return (name, path, None) in PUBLISHED_GAPS or (name, path, json.dumps(instance)) in PUBLISHED_GAPS


def check(name: str, instance: Any) -> Any:
    """`instance` validates against OpenAI's schema `name`; returns it."""
    schema = {"$ref": f"#/components/schemas/{name}", "components": {"schemas": COMPONENTS}}
    errors = [
        f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message[:300]}"
        for e in Draft202012Validator(schema).iter_errors(instance)
        if not published_gap(name, "/".join(map(str, e.absolute_path)), e.instance)
    ]
    assert not errors, f"{name}: " + "; ".join(errors[:5])
    return instance


def chunks(response: httpx.Response) -> list[Any]:
    """A streamed response's JSON events (without the closing [DONE])."""
    assert response.status_code == 200, response.text
    data = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(item) for item in data[:-1]]


@pytest.fixture
def http(settings: Settings, tenant: Tenant) -> Iterator[httpx.Client]:
    with (
        live(create_app(settings)) as url,
        httpx.Client(base_url=f"{url}/v1", headers=tenant.headers, timeout=120) as client,
    ):
        yield client


def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()


def test_files_models_and_fine_tuning_jobs_match_openais_schemas(
    http: httpx.Client, settings: Settings, tenant: Tenant
) -> None:
    upload = {"purpose": "fine-tune"}
    sft_file = check("OpenAIFile", ok(http.post("/files", data=upload, files={"file": ("f.jsonl", fruit_file())}), 201))
    spare = ok(http.post("/files", data=upload, files={"file": ("g.jsonl", fruit_file())}), 201)
    check("ListFilesResponse", ok(http.get("/files")))
    check("OpenAIFile", ok(http.get(f"/files/{sft_file['id']}")))
    check("DeleteFileResponse", ok(http.delete(f"/files/{spare['id']}")))
    models = check("ListModelsResponse", ok(http.get("/models")))
    check("Model", ok(http.get(f"/models/{models['data'][0]['id']}")))

    sft = check(
        "FineTuningJob",
        ok(
            http.post(
                "/fine_tuning/jobs",
                json={
                    "model": "tiny-random-llama",
                    "training_file": sft_file["id"],
                    "suffix": "fruit",
                    "metadata": {"team": "orchard"},
                    "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
                },
            )
        ),
    )
    assert run_training_job(settings, sft["id"]) is not None
    done = check("FineTuningJob", ok(http.get(f"/fine_tuning/jobs/{sft['id']}")))
    assert done["status"] == "succeeded"
    check("ListPaginatedFineTuningJobsResponse", ok(http.get("/fine_tuning/jobs", params={"limit": 5})))
    events = check("ListFineTuningJobEventsResponse", ok(http.get(f"/fine_tuning/jobs/{sft['id']}/events")))
    assert any(e["type"] == "metrics" for e in events["data"])
    checkpoints = check(
        "ListFineTuningJobCheckpointsResponse", ok(http.get(f"/fine_tuning/jobs/{sft['id']}/checkpoints"))
    )
    assert checkpoints["data"]

    # DPO continuing from the adapter, paused and resumed while queued, then cancelled.
    dpo_file = ok(http.post("/files", data=upload, files={"file": ("p.jsonl", preference_file(colour_lines(4)))}), 201)
    dpo = check(
        "FineTuningJob",
        ok(
            http.post(
                "/fine_tuning/jobs",
                json={
                    "model": done["fine_tuned_model"],
                    "training_file": dpo_file["id"],
                    "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}},
                },
            )
        ),
    )
    assert dpo["method"]["type"] == "dpo"
    assert check("FineTuningJob", ok(http.post(f"/fine_tuning/jobs/{dpo['id']}/pause")))["status"] == "paused"
    check("FineTuningJob", ok(http.post(f"/fine_tuning/jobs/{dpo['id']}/resume")))
    cancelled = check("FineTuningJob", ok(http.post(f"/fine_tuning/jobs/{dpo['id']}/cancel")))
    assert cancelled["status"] == "cancelled"

    check("ErrorResponse", ok(http.get("/fine_tuning/jobs/ftjob-nothing"), 404))
    check("ErrorResponse", ok(http.post("/fine_tuning/jobs", json={"model": "tiny-random-llama"}), 422))


def test_completions_and_their_chunks_match_openais_schemas(
    http: httpx.Client, settings: Settings, tenant: Tenant, tmp_path: Path
) -> None:
    chat: Any = {"model": "tiny-random-llama", "messages": ASK, "max_completion_tokens": 6, "seed": 1}
    check("CreateChatCompletionResponse", ok(http.post("/chat/completions", json={**chat, "n": 2})))
    with_logprobs = {**chat, "logprobs": True, "top_logprobs": 2}
    check("CreateChatCompletionResponse", ok(http.post("/chat/completions", json=with_logprobs)))
    person = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}}, "required": ["name"]}
    structured = {
        **chat,
        "max_completion_tokens": 40,
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": person}},
    }
    check("CreateChatCompletionResponse", ok(http.post("/chat/completions", json=structured)))
    streamed = {**with_logprobs, "stream": True, "stream_options": {"include_usage": True}}
    for chunk in chunks(http.post("/chat/completions", json=streamed)):
        check("CreateChatCompletionStreamResponse", chunk)

    model, _ = register_hermes(settings, tenant, tmp_path, max_positions=2048)
    tools: Any = {"model": model, "messages": ASK, "tools": TOOLS, "tool_choice": "required", "seed": 2}
    answer = check("CreateChatCompletionResponse", ok(http.post("/chat/completions", json=tools)))
    assert answer["choices"][0]["message"]["tool_calls"]
    parts = [
        check("CreateChatCompletionStreamResponse", c)
        for c in chunks(http.post("/chat/completions", json={**tools, "stream": True}))
    ]
    assert any(p["choices"] and p["choices"][0]["delta"].get("tool_calls") for p in parts)
    text = {**tools, "tool_choice": "none", "max_completion_tokens": 4}
    assert (
        "tool_calls"
        not in check("CreateChatCompletionResponse", ok(http.post("/chat/completions", json=text)))["choices"][0][
            "message"
        ]
    )

    completion: Any = {"model": "tiny-random-llama", "prompt": "Once upon", "max_tokens": 5, "logprobs": 2}
    check("CreateCompletionResponse", ok(http.post("/completions", json=completion)))
    for chunk in chunks(http.post("/completions", json={**completion, "stream": True})):
        check("CreateCompletionResponse", chunk)
    check("ErrorResponse", ok(http.post("/chat/completions", json={**chat, "model": "no-such-model"}), 404))
