"""OpenAI's inference options through the official `openai` client against a live server (uvicorn on loopback):
the response shapes OpenAI publishes (`message.refusal`, the files list's `first_id`/`last_id`), `n` choices
(streamed with their index), presence and frequency penalties, `logit_bias`, `seed`, `user` and
`max_completion_tokens`, and each refusal a 4xx naming its field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import OpenAI

from app.core.settings import Settings
from app.main import create_app
from tests.conftest import Tenant, chat_lines, jsonl, live

pytestmark = pytest.mark.parametrize("backend", ["embedded"], indirect=True)

MODEL = "tiny-random-llama"
MESSAGES: Any = [{"role": "user", "content": "Tell me a story."}]


@pytest.fixture
def server(settings: Settings) -> Iterator[str]:
    with live(create_app(settings)) as url:
        yield url


@pytest.fixture
def openai(server: str, tenant: Tenant) -> OpenAI:
    return OpenAI(base_url=f"{server}/v1", api_key=tenant.key, max_retries=0)


def sse(response: httpx.Response) -> list[Any]:
    data = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_chat_messages_carry_refusal_and_the_files_list_its_ends(server: str, tenant: Tenant, openai: OpenAI) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3, "temperature": 0}
    raw = httpx.post(f"{server}/v1/chat/completions", headers=tenant.headers, json=body, timeout=60).json()
    assert raw["choices"][0]["message"] == {"role": "assistant", "content": raw["choices"][0]["message"]["content"]} | {
        "refusal": None
    }
    with httpx.stream(
        "POST", f"{server}/v1/chat/completions", headers=tenant.headers, json={**body, "stream": True}, timeout=60
    ) as r:
        chunks = sse(r)
    assert (
        chunks[0]["choices"][0]["delta"]["refusal"] is None and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    )
    assert openai.chat.completions.create(**body).choices[0].message.refusal is None

    listed = httpx.get(f"{server}/v1/files", headers=tenant.headers).json()
    assert listed == {"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}
    ids = [openai.files.create(file=(f"f{i}.jsonl", jsonl(chat_lines(1))), purpose="fine-tune").id for i in range(3)]
    page = httpx.get(f"{server}/v1/files?limit=2", headers=tenant.headers).json()
    assert [f["id"] for f in page["data"]] == ids[:0:-1]  # newest first
    assert (page["first_id"], page["last_id"], page["has_more"]) == (ids[2], ids[1], True)
    rest = httpx.get(f"{server}/v1/files?limit=2&after={page['last_id']}", headers=tenant.headers).json()
    assert (rest["first_id"], rest["last_id"], rest["has_more"]) == (ids[0], ids[0], False)
    assert [f.id for f in openai.files.list(limit=2)] == ids[::-1]
