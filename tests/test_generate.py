"""POST /generate: base model, one adapter, several adapters from one base model, bad requests."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from app.core.settings import Settings
from tests.conftest import Tenant
from tests.test_worker import start_job
from worker.runner import run_training_job


def train(client: TestClient, tenant: Tenant, settings: Settings, word: str) -> str:
    lines = [json.dumps({"prompt": "The secret word is", "completion": f" {word}"})] * 8
    job_id = start_job(client, tenant, lines, n_epochs=8, learning_rate=0.05, target_modules="all-linear")
    adapter_id = run_training_job(settings, job_id)
    assert adapter_id is not None
    return adapter_id


def generate(client: TestClient, tenant: Tenant, **body: object) -> dict[str, object]:
    r = client.post("/generate", headers=tenant.headers, json={"temperature": 0, "max_tokens": 3, **body})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_each_adapter_answers_with_what_it_learned(client: TestClient, tenant: Tenant, settings: Settings) -> None:
    """Two adapters on one base model, interleaved requests: each row gets its own adapter's output."""
    plum, kiwi = train(client, tenant, settings, "plum"), train(client, tenant, settings, "kiwi")
    for adapter_id, word in [(plum, "plum"), (kiwi, "kiwi"), (plum, "plum"), (kiwi, "kiwi")]:
        out = generate(client, tenant, adapter_id=adapter_id, prompt="The secret word is")
        assert str(out["text"]).startswith(f" {word}"), out
        assert out["adapter_id"] == adapter_id and out["base_model"] == "tiny-random-llama"
        assert out["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    base = generate(client, tenant, base_model="tiny-random-llama", prompt="The secret word is")
    assert not str(base["text"]).startswith((" plum", " kiwi"))
    assert base["adapter_id"] is None


def test_sampling_is_reproducible_with_a_seed(client: TestClient, tenant: Tenant) -> None:
    body = {"base_model": "tiny-random-llama", "prompt": "Once upon a time", "temperature": 1.0, "max_tokens": 12}
    first = generate(client, tenant, seed=7, **body)
    assert generate(client, tenant, seed=7, **body)["text"] == first["text"]
    assert any(generate(client, tenant, seed=s, **body)["text"] != first["text"] for s in (8, 9, 10))


def test_chat_messages_and_stop_strings(client: TestClient, tenant: Tenant) -> None:
    messages = [{"role": "user", "content": "Hello"}]
    full = generate(client, tenant, base_model="tiny-random-llama", messages=messages, max_tokens=12)
    assert full["finish_reason"] in ("length", "stop")
    assert full["usage"]["prompt_tokens"] > 10  # type: ignore[index]  # the chat template adds a system prompt
    text = str(full["text"])
    if len(text) > 4:
        stop = text[2:4]
        cut = generate(client, tenant, base_model="tiny-random-llama", messages=messages, max_tokens=12, stop=stop)
        assert cut["text"] == text[: text.find(stop)]
        assert cut["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"prompt": "x", "adapter_id": "adapter-nope"}, 404, "adapter_id"),
        ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, 422, None),
        ({}, 422, None),
        ({"prompt": "x", "base_model": "nope"}, 422, "base_model"),
        ({"prompt": "x", "max_tokens": 0}, 422, "max_tokens"),
        ({"prompt": "x", "temperature": 3}, 422, "temperature"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
        ({"messages": [{"role": "robot", "content": "y"}]}, 422, "messages.0.role"),
        ({"prompt": "x", "max_tokens": 2048, "base_model": "tiny-random-llama"}, 422, "max_tokens"),
    ],
)
def test_bad_generate_requests(
    client: TestClient, tenant: Tenant, body: dict[str, object], status: int, param: str | None
) -> None:
    r = client.post("/generate", headers=tenant.headers, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param
    assert r.json()["error"]["message"]


def test_another_tenants_adapter_is_404(
    client: TestClient,
    make_tenant,
    tenant: Tenant,
    settings: Settings,  # type: ignore[no-untyped-def]
) -> None:
    adapter_id = train(client, tenant, settings, "plum")
    other = make_tenant()
    r = client.post("/generate", headers=other.headers, json={"adapter_id": adapter_id, "prompt": "x"})
    assert r.status_code == 404
    for path in (f"/adapters/{adapter_id}", f"/adapters/{adapter_id}/download"):
        assert client.get(path, headers=other.headers).status_code == 404
    assert client.get("/adapters", headers=other.headers).json()["data"] == []
