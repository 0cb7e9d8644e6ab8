"""POST/GET/DELETE /v1/files: line-by-line validation, streaming to the object store, tenant scoping."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.core.settings import Settings
from app.core.storage import ObjectStorage
from app.main import create_app
from tests.conftest import Tenant, chat_lines, jsonl, upload


def stored_datasets(settings: Settings) -> list[str]:
    return ObjectStorage.from_settings(settings).list_keys("datasets")


def test_chat_upload_is_counted_hashed_and_stored(client: TestClient, tenant: Tenant, settings: Settings) -> None:
    content = jsonl(chat_lines(6))
    r = upload(client, tenant, content)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["id"].startswith("file-")
    assert body["format"] == "chat"
    assert body["n_examples"] == 6
    assert body["n_tokens"] > 6 * 10  # the chat template adds a system prompt to every example
    assert body["bytes"] == len(content)
    assert body["sha256"] == hashlib.sha256(content).hexdigest()
    assert body["purpose"] == "fine-tune"
    stored = stored_datasets(settings)
    assert len(stored) == 1 and body["id"] in stored[0]
    assert ObjectStorage.from_settings(settings).read_bytes(stored[0]) == content

    assert client.get(f"/v1/files/{body['id']}", headers=tenant.headers).json() == body
    listed = client.get("/v1/files", headers=tenant.headers).json()["data"]
    assert [f["id"] for f in listed] == [body["id"]]


@pytest.mark.parametrize(
    ("lines", "fmt"),
    [
        (
            [json.dumps({"prompt": "2+2=", "completion": " 4"}), json.dumps({"prompt": "3+3=", "completion": " 6"})],
            "prompt_completion",
        ),
        ([json.dumps({"text": "The sky is blue."}), json.dumps({"text": "Grass is green."})], "text"),
    ],
)
def test_other_formats_are_accepted(client: TestClient, tenant: Tenant, lines: list[str], fmt: str) -> None:
    r = upload(client, tenant, jsonl(lines))
    assert r.status_code == 201, r.text
    assert r.json()["format"] == fmt
    assert r.json()["n_examples"] == 2


def test_every_bad_line_is_reported_and_nothing_is_kept(client: TestClient, tenant: Tenant, settings: Settings) -> None:
    good = chat_lines(2)
    lines = [
        good[0],
        '{"messages": [{"role": "bot", "content": "hi"}]}',
        "this is not json",
        json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}),
        good[1],
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps({"prompt": "a", "completion": "b"}),
        json.dumps(["a", "list"]),
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}]}),
        json.dumps({"id": 1}),
    ]
    r = upload(client, tenant, jsonl(lines))
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["code"] == "invalid_file"
    assert error["param"] == "file"
    assert error["message"].startswith("line 2: ")
    report = error["report"]
    got = [(e["line"], e["code"]) for e in report["errors"]]
    assert got == [
        (2, "invalid_role"),
        (3, "invalid_json"),
        (4, "missing_field"),
        (6, "no_assistant_message"),
        (7, "mixed_formats"),
        (8, "invalid_type"),
        (9, "invalid_type"),
        (10, "unknown_format"),
    ]
    assert report["n_errors"] == 8
    assert report["n_examples"] == 2
    assert report["errors"][2]["message"] == 'messages[0]: missing field "content"'
    assert stored_datasets(settings) == []
    assert client.get("/v1/files", headers=tenant.headers).json()["data"] == []


def test_openai_features_tuneforge_does_not_train_on_are_refused_line_by_line(
    client: TestClient, tenant: Tenant, settings: Settings
) -> None:
    user = {"role": "user", "content": "What is the weather?"}
    answer = {"role": "assistant", "content": "Sunny."}
    call = {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w"}}]}
    lines = [
        chat_lines(1)[0],
        json.dumps({"messages": [user, call]}),
        json.dumps({"messages": [user, {"role": "tool", "content": "{}", "tool_call_id": "c1"}, answer]}),
        json.dumps({"messages": [user, answer], "tools": [{"type": "function", "function": {"name": "w"}}]}),
        json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, answer]}),
        json.dumps({"messages": [user, {**answer, "weight": 0}]}),
    ]
    r = upload(client, tenant, jsonl(lines))
    assert r.status_code == 422
    errors = r.json()["error"]["report"]["errors"]
    assert [(e["line"], e["code"]) for e in errors] == [
        (2, "missing_field"),  # tool lines are checked (tests/test_tool_files.py)...
        (3, "unmatched_tool_result"),
        # ...and a well-formed one is accepted when no model is named, to be counted by its job's model
        # (tests/test_tool_files.py; naming a model without tool support refuses it).
        (5, "unsupported_feature"),
        (6, "no_assistant_message"),
    ]
    messages = [e["message"] for e in errors]
    assert messages[0] == 'messages[1].tool_calls[0].function: missing field "arguments"'
    assert messages[1].startswith('messages[1].tool_call_id: "c1" answers no unanswered call')
    assert "content parts" in messages[2] and "give content as a string" in messages[2]
    assert '"weight": 0' in messages[3]
    assert stored_datasets(settings) == []


def test_non_utf8_line_is_named(client: TestClient, tenant: Tenant) -> None:
    content = jsonl(chat_lines(1)) + b'{"text": "caf\xe9"}\n'
    r = upload(client, tenant, content)
    assert r.status_code == 422
    errors = r.json()["error"]["report"]["errors"]
    assert errors == [{"line": 2, "code": "invalid_utf8", "message": "not valid UTF-8 at byte 14 of the line"}]


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file_is_rejected(client: TestClient, tenant: Tenant, content: bytes) -> None:
    r = upload(client, tenant, content)
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "empty_file"
    assert "empty" in r.json()["error"]["message"]


def test_wrong_purpose_and_file_type(client: TestClient, tenant: Tenant) -> None:
    r = client.post(
        "/v1/files",
        headers=tenant.headers,
        files={"file": ("t.jsonl", jsonl(chat_lines(1)))},
        data={"purpose": "assistants"},
    )
    assert r.status_code == 422
    assert r.json()["error"]["param"] == "purpose"
    r = upload(client, tenant, jsonl(chat_lines(1)), filename="train.csv")
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "invalid_file_type"


def test_missing_file_field(client: TestClient, tenant: Tenant) -> None:
    r = client.post("/v1/files", headers=tenant.headers, data={"purpose": "fine-tune"})
    assert r.status_code == 422
    assert r.json()["error"]["param"] == "file"
    assert r.json()["error"]["code"] == "missing_field"
    # A multipart body whose only file is under another name: the same answer.
    r = client.post("/v1/files", headers=tenant.headers, files={"data": ("train.jsonl", b"{}")})
    assert r.status_code == 422
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == ("file", "missing_field")


def test_over_the_size_limit_is_413_and_not_stored(settings: Settings, tenant: Tenant) -> None:
    small = settings.model_copy(update={"max_upload_bytes": 2000})
    with TestClient(create_app(small)) as client:
        content = jsonl(chat_lines(40))  # ~5 KB: passes the early Content-Length check, fails while reading
        assert len(content) > 2000
        r = upload(client, tenant, content)
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "file_too_large"
        assert "2000 bytes" in r.json()["error"]["message"]
        big = jsonl(chat_lines(1)) * 1000  # refused from its Content-Length, unread
        r = upload(client, tenant, big)
        assert r.status_code == 413
    assert stored_datasets(settings) == []


def test_delete_removes_the_object_and_hides_the_file(client: TestClient, tenant: Tenant, settings: Settings) -> None:
    file_id = upload(client, tenant, jsonl(chat_lines(2))).json()["id"]
    r = client.delete(f"/v1/files/{file_id}", headers=tenant.headers)
    assert r.status_code == 200
    assert r.json() == {"id": file_id, "object": "file", "deleted": True}
    assert client.get(f"/v1/files/{file_id}", headers=tenant.headers).status_code == 404
    assert client.delete(f"/v1/files/{file_id}", headers=tenant.headers).status_code == 404
    assert stored_datasets(settings) == []


def test_tenants_do_not_see_each_other(client: TestClient, make_tenant) -> None:  # type: ignore[no-untyped-def]
    alice, bob = make_tenant(), make_tenant()
    file_id = upload(client, alice, jsonl(chat_lines(2))).json()["id"]
    r = client.get(f"/v1/files/{file_id}", headers=bob.headers)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"
    assert client.delete(f"/v1/files/{file_id}", headers=bob.headers).status_code == 404
    assert client.get("/v1/files", headers=bob.headers).json()["data"] == []
    assert client.get(f"/v1/files/{file_id}", headers=alice.headers).status_code == 200


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"Authorization": "Bearer tf_not-a-real-key"}, "invalid_api_key"),
        ({"Authorization": "Basic abc"}, "invalid_api_key"),
    ],
)
def test_requests_without_a_valid_key_are_401(client: TestClient, headers: dict[str, str], code: str) -> None:
    for method, path in [("get", "/v1/files"), ("get", "/jobs"), ("get", "/adapters"), ("post", "/generate")]:
        r = getattr(client, method)(path, headers=headers)
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"]["code"] == code
        assert r.json()["error"]["type"] == "authentication_error"


def test_health_needs_no_key(client: TestClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


def test_token_counts_match_what_training_sees(client: TestClient, tenant: Tenant, settings: Settings) -> None:
    """The upload's n_tokens is the token count of the examples as the worker encodes them."""
    from app.ml.formatting import encode_record
    from app.ml.models import BUILTINS, ModelStore

    tokenizer = ModelStore(settings.models_dir, None).tokenizer(BUILTINS["tiny-random-llama"])
    for lines in (
        chat_lines(600),  # more than one tokenizer batch
        [json.dumps({"prompt": f"{i} + {i} =", "completion": f" {2 * i}"}) for i in range(5)],
        [json.dumps({"text": "Plain text, with punctuation; and numbers 123."})] * 3,
    ):
        expected = sum(len(encode_record(tokenizer, json.loads(line)).input_ids) for line in lines)
        body = upload(client, tenant, jsonl(lines)).json()
        assert body["n_tokens"] == expected
        assert body["n_examples"] == len(lines)


def test_a_data_dir_with_spaces_and_plus_signs_stores_objects_in_it(tmp_path: Path) -> None:
    """The local store's URL is percent-encoded (file:///…/a%20b%2Bc): objects still land in the folder named."""
    data_dir = tmp_path / "a b+c"
    storage = ObjectStorage.from_settings(Settings(data_dir=data_dir))
    storage.put_bytes("datasets/t/x.jsonl", b"{}\n")
    assert (data_dir / "objects" / "datasets" / "t" / "x.jsonl").read_bytes() == b"{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a b+c"]
