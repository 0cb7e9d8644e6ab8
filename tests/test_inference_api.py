"""Inference over HTTP, against a real server (uvicorn on loopback): OpenAI's `/v1/completions`,
`/v1/chat/completions` and `/v1/models` driven by the official `openai` package (streaming too), native
`/generate` streaming, a client that goes away freeing its row, 429 when the engine is full, and the `serve`
role."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from openai import BadRequestError, NotFoundError, OpenAI, RateLimitError, UnprocessableEntityError

from app.core.settings import Settings
from app.main import create_app
from app.ml.models import BUILTINS
from app.ml.serving import GenerationRequest
from tests.conftest import Tenant, jsonl, live, tenant_id, upload
from worker.runner import run_training_job

pytestmark = pytest.mark.parametrize("backend", ["embedded"], indirect=True)

PROMPT = "The secret word is"


@pytest.fixture
def server(settings: Settings) -> Iterator[tuple[str, FastAPI]]:
    app = create_app(settings)
    with live(app) as url:
        yield url, app


def train(client: TestClient, tenant: Tenant, settings: Settings, word: str, suffix: str) -> str:
    lines = [json.dumps({"prompt": PROMPT, "completion": f" {word}"})] * 8
    file_id = upload(client, tenant, jsonl(lines)).json()["id"]
    hyperparameters = {"n_epochs": 8, "learning_rate": 0.05, "target_modules": "all-linear"}
    r = client.post(
        "/jobs",
        headers=tenant.headers,
        json={
            "base_model": "tiny-random-llama",
            "training_file": file_id,
            "suffix": suffix,
            "hyperparameters": hyperparameters,
        },
    )
    assert r.status_code == 201, r.text
    adapter_id = run_training_job(settings, r.json()["id"])
    assert adapter_id is not None
    return adapter_id


def test_the_openai_client_works_unchanged(
    client: TestClient, tenant: Tenant, settings: Settings, server: tuple[str, FastAPI]
) -> None:
    adapter_id = train(client, tenant, settings, "plum", suffix="plum")
    url, _ = server
    openai = OpenAI(base_url=f"{url}/v1", api_key=tenant.key, max_retries=0)

    # Models: the base models, then the tenant's adapters.
    listed = {m.id: m for m in openai.models.list()}
    assert "tiny-random-llama" in listed and adapter_id in listed
    assert (listed[adapter_id].model_extra or {})["parent"] == "tiny-random-llama"
    assert openai.models.retrieve(adapter_id).id == adapter_id

    # Completions, by adapter id and by name; streamed, the same text.
    done = openai.completions.create(model=adapter_id, prompt=PROMPT, max_tokens=3, temperature=0)
    assert done.object == "text_completion" and done.model == adapter_id
    assert done.choices[0].text.startswith(" plum"), done
    assert done.usage is not None and done.usage.completion_tokens == 3
    by_name = openai.completions.create(model="tiny-random-llama:plum", prompt=PROMPT, max_tokens=3, temperature=0)
    assert by_name.choices[0].text == done.choices[0].text
    chunks = list(
        openai.completions.create(
            model=adapter_id,
            prompt=PROMPT,
            max_tokens=3,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == done.usage.total_tokens
    base = openai.completions.create(model="tiny-random-llama", prompt=PROMPT, max_tokens=3, temperature=0)
    assert not base.choices[0].text.startswith(" plum")

    # Chat, with log-probabilities; streamed, the same text.
    messages: Any = [{"role": "user", "content": "Hello"}]
    chat = openai.chat.completions.create(
        model="tiny-random-llama", messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2
    )
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.choices[0].logprobs is not None and chat.choices[0].logprobs.content is not None
    assert chat.usage is not None and len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    assert all(len(item.top_logprobs) == 2 for item in chat.choices[0].logprobs.content)
    native = client.post(
        "/generate",
        headers=tenant.headers,
        json={"base_model": "tiny-random-llama", "messages": messages, "max_tokens": 8, "temperature": 0},
    ).json()
    assert chat.choices[0].message.content == native["text"]
    stream = openai.chat.completions.create(
        model="tiny-random-llama", messages=messages, max_tokens=8, temperature=0, stream=True
    )
    deltas = [c.choices[0] for c in stream]
    assert deltas[0].delta.role == "assistant"
    assert "".join(d.delta.content or "" for d in deltas) == chat.choices[0].message.content
    assert deltas[-1].finish_reason == chat.choices[0].finish_reason
    adapted = openai.chat.completions.create(model=adapter_id, messages=messages, max_tokens=4, temperature=0)
    assert adapted.model == adapter_id and adapted.choices[0].message.content is not None

    # Errors in OpenAI's shape, as the client's exceptions.
    with pytest.raises(NotFoundError) as missing:
        openai.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=1)
    assert missing.value.code == "model_not_found"
    with pytest.raises((BadRequestError, UnprocessableEntityError)):
        openai.completions.create(model=adapter_id, prompt=PROMPT, max_tokens=1, echo=True)


def sse(lines: Iterator[str]) -> Iterator[Any]:
    for line in lines:
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            yield data if data == "[DONE]" else json.loads(data)


def test_native_generate_streams_server_sent_events(tenant: Tenant, server: tuple[str, FastAPI]) -> None:
    url, _ = server
    body = {"base_model": "tiny-random-llama", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    whole = httpx.post(f"{url}/generate", headers=tenant.headers, json=body, timeout=60).json()
    with httpx.stream(
        "POST", f"{url}/generate", headers=tenant.headers, json={**body, "stream": True}, timeout=60
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
        events = list(sse(r.iter_lines()))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert [c["finish_reason"] for c in chunks if c["finish_reason"]] == [whole["finish_reason"]]
    assert chunks[-1]["usage"] == whole["usage"]
    # An error before the first token is an HTTP status, not a 200 stream.
    r = httpx.post(
        f"{url}/generate", headers=tenant.headers, json={**body, "adapter_id": "adapter-nope", "stream": True}
    )
    assert r.status_code == 404 and r.json()["error"]["param"] == "adapter_id"


def running(app: FastAPI) -> int:
    return int(app.state.engine.stats()["running"])


def wait_until(condition: Any, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_a_client_that_goes_away_frees_its_row_at_once(tenant: Tenant, server: tuple[str, FastAPI]) -> None:
    url, app = server
    # Greedy decoding of this prompt never reaches the end-of-sequence token (checked first: it is deterministic),
    # so only a disconnection ends the requests below early.
    body = {"base_model": "tiny-random-llama", "prompt": PROMPT, "temperature": 0}
    probe = httpx.post(f"{url}/generate", headers=tenant.headers, json={**body, "max_tokens": 200}, timeout=120)
    assert probe.json()["finish_reason"] == "length"
    long = {**body, "max_tokens": 1900}

    with httpx.stream("POST", f"{url}/generate", headers=tenant.headers, json={**long, "stream": True}) as r:
        lines = r.iter_lines()  # kept: dropping the iterator would close the response here, not at the block's end
        next(lines)
        assert wait_until(lambda: running(app) == 1)  # it joins the batch just after its first token
        time.sleep(0.3)
        assert running(app) == 1  # and goes on while its client is there
    assert wait_until(lambda: running(app) == 0), "the streaming request kept decoding after its client left"
    steps = app.state.engine.steps
    time.sleep(0.3)
    assert app.state.engine.steps == steps  # nothing decodes any more

    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/generate", headers=tenant.headers, json=long, timeout=1.0)
    assert wait_until(lambda: running(app) == 0), "the waiting request kept decoding after its client left"


def test_a_full_engine_answers_429_with_retry_after(tenant: Tenant, settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"serving_max_batch": 1, "serving_max_waiting": 1}))
    with live(app) as url:
        body = {"model": "tiny-random-llama", "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
        assert httpx.post(f"{url}/v1/completions", headers=tenant.headers, json=body, timeout=60).status_code == 200
        engine = app.state.engine
        record = BUILTINS["tiny-random-llama"]
        # The tenant's own requests fill the batch and the line (a tenant with none in the engine would get in).
        owner = tenant_id(settings, tenant)
        busy = engine.submit(
            GenerationRequest(model=record, input_ids=[1, 5], max_tokens=4000, ignore_eos=True, owner=owner)
        )
        assert wait_until(lambda: engine.stats()["running"] == 1)
        queued = engine.submit(GenerationRequest(model=record, input_ids=[1, 5], max_tokens=1, owner=owner))
        r = httpx.post(f"{url}/v1/completions", headers=tenant.headers, json=body, timeout=60)
        assert r.status_code == 429 and r.headers["Retry-After"] == "2"
        assert r.json()["error"]["code"] == "engine_overloaded"
        with pytest.raises(RateLimitError):
            OpenAI(base_url=f"{url}/v1", api_key=tenant.key, max_retries=0).completions.create(**body)
        busy.cancel()
        assert queued.result(timeout=60).completion_tokens == 1


def test_the_serve_role_has_the_inference_routes_only(tenant: Tenant, settings: Settings) -> None:
    with TestClient(create_app(settings, role="serve")) as serve:
        r = serve.post(
            "/v1/completions",
            headers=tenant.headers,
            json={"model": "tiny-random-llama", "prompt": PROMPT, "max_tokens": 2, "temperature": 0},
        )
        assert r.status_code == 200, r.text
        assert serve.get("/v1/models", headers=tenant.headers).status_code == 200
        assert serve.get("/healthz").status_code == 200
        assert serve.get("/jobs", headers=tenant.headers).status_code == 404
        assert serve.post("/v1/files", headers=tenant.headers).status_code == 404
