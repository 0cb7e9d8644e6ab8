"""OpenAI's inference options through the official `openai` client against a live server (uvicorn on loopback):
the response shapes OpenAI publishes (`message.refusal`, the files list's `first_id`/`last_id`), `n` choices
(streamed with their index), presence and frequency penalties, `logit_bias`, `seed`, `user` and
`max_completion_tokens`, and each refusal a 4xx naming its field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI, UnprocessableEntityError

from app.core.settings import Settings
from app.main import create_app
from tests.conftest import Tenant, chat_lines, jsonl, live

# Inference does not touch the database beyond resolving the model: on the embedded backend only; the files list
# on every backend.
EMBEDDED = pytest.mark.parametrize("backend", ["embedded"], indirect=True)

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


def by_index(chunks: list[Any]) -> dict[int, list[Any]]:
    choices: dict[int, list[Any]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            choices.setdefault(choice.index, []).append(choice)
    return choices


@EMBEDDED
def test_n_choices_with_a_seed_are_the_same_every_time_and_stream_by_index(openai: OpenAI) -> None:
    options: Any = {"model": MODEL, "messages": MESSAGES, "temperature": 1.0, "seed": 5, "user": "someone@example.com"}
    one = openai.chat.completions.create(**options, max_completion_tokens=6)
    three = openai.chat.completions.create(**options, n=3, max_completion_tokens=6, logprobs=True)
    assert [c.index for c in three.choices] == [0, 1, 2]
    texts = [c.message.content for c in three.choices]
    assert texts[0] == one.choices[0].message.content  # choice 0 samples as the request alone would
    assert len(set(texts)) == 3  # each choice samples apart
    assert three.usage is not None and one.usage is not None
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    assert three.usage.completion_tokens == sum(len(c.logprobs.content or []) for c in three.choices if c.logprobs)
    again = openai.chat.completions.create(**options, n=3, max_tokens=6)  # max_tokens: the same bound
    assert [c.message.content for c in again.choices] == texts

    stream = openai.chat.completions.create(
        **options, n=3, max_completion_tokens=6, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    streamed = by_index(chunks)
    assert sorted(streamed) == [0, 1, 2]
    for index, pieces in streamed.items():
        assert pieces[0].delta.role == "assistant"
        assert "".join(p.delta.content or "" for p in pieces) == texts[index]
        assert [p.finish_reason for p in pieces if p.finish_reason] == [three.choices[index].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == three.usage.total_tokens

    # Completions too; greedy choices are all the same text.
    done = openai.completions.create(model=MODEL, prompt="Once upon", max_tokens=5, temperature=0, n=2)
    assert [c.index for c in done.choices] == [0, 1] and done.choices[0].text == done.choices[1].text
    streamed_text = by_index(
        list(openai.completions.create(model=MODEL, prompt="Once upon", max_tokens=5, temperature=0, n=2, stream=True))
    )
    assert {i: "".join(p.text for p in pieces) for i, pieces in streamed_text.items()} == {
        0: done.choices[0].text,
        1: done.choices[1].text,
    }


@EMBEDDED
def test_a_seeded_request_gives_the_same_text_beside_others(openai: OpenAI) -> None:
    from concurrent.futures import ThreadPoolExecutor

    seeded: Any = {"model": MODEL, "prompt": "Once upon", "max_tokens": 12, "temperature": 1.0, "seed": 42}
    alone = openai.completions.create(**seeded).choices[0].text
    with ThreadPoolExecutor(6) as pool:
        others = [
            pool.submit(openai.completions.create, model=MODEL, prompt=f"Other {i}", max_tokens=40, temperature=1.0)
            for i in range(5)
        ]
        crowded = pool.submit(openai.completions.create, **seeded)
        assert crowded.result().choices[0].text == alone
        assert all(o.result().choices[0].finish_reason in ("stop", "length") for o in others)
    assert openai.completions.create(**{**seeded, "seed": 43}).choices[0].text != alone


@EMBEDDED
def test_logit_bias_and_penalties_reach_the_tokens(openai: OpenAI, model_cache_dir: Path) -> None:
    from app.ml.models import BUILTINS, ModelStore

    tokenizer = ModelStore(model_cache_dir, None).tokenizer(BUILTINS[MODEL])
    forced = openai.completions.create(
        model=MODEL, prompt="Once upon", max_tokens=4, temperature=1.0, logit_bias={"500": 100}, logprobs=0
    )
    assert forced.choices[0].logprobs is not None
    assert forced.choices[0].logprobs.tokens == [tokenizer.decode([500])] * 4
    favoured = {"500": 12, "600": 11, "700": 10}  # above the tiny model's logits: they repeat
    plain = openai.completions.create(
        model=MODEL, prompt="Once upon", max_tokens=16, temperature=0, logit_bias=favoured, logprobs=0
    )
    penalized = openai.completions.create(
        model=MODEL,
        prompt="Once upon",
        max_tokens=16,
        temperature=0,
        logit_bias=favoured,
        frequency_penalty=1.5,
        presence_penalty=0.5,
        logprobs=0,
    )
    assert plain.choices[0].logprobs is not None and penalized.choices[0].logprobs is not None
    favoured_tokens = {tokenizer.decode([int(t)]) for t in favoured}
    assert set(plain.choices[0].logprobs.tokens) <= favoured_tokens
    assert not set(penalized.choices[0].logprobs.tokens) <= favoured_tokens  # the penalties let other tokens in


@EMBEDDED
@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"n": 9}, "n"),  # past TUNEFORGE_SERVING_MAX_CHOICES (8)
        ({"n": 500}, "n"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"logit_bias": {"not-a-token": 1}}, "logit_bias.not-a-token.[key]"),
        ({"logit_bias": {"49152": 1}}, "logit_bias"),  # the tokenizer has ids 0 to 49151
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens"),
        ({"user": "u" * 257}, "user"),
    ],
)
def test_each_refusal_names_its_field(openai: OpenAI, options: dict[str, Any], param: str) -> None:
    with pytest.raises(UnprocessableEntityError) as refused:
        openai.chat.completions.create(model=MODEL, messages=MESSAGES, **options)
    assert refused.value.param == param, refused.value.message
