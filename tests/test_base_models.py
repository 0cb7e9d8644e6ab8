"""Base models an operator brings: `tuneforge models add/list/remove`, GET /v1/models, and the whole loop on
several architecture families, each with its own tokenizer (registered through the real CLI)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel
from sqlalchemy import select, update
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from app.cli import cli
from app.core.db import session_scope
from app.core.models import FileTokenCount, Job, RegisteredModel
from app.core.settings import Settings, get_settings
from app.core.storage import ObjectStorage
from app.main import create_app
from app.ml.formatting import encode_chat_prompt, encode_prompt
from app.ml.models import BLOB_PREFIX, BUILTINS
from tests.conftest import Tenant, chat_lines, jsonl
from tests.model_factories import build_tiny_model, write_chat_template
from worker.runner import run_training_job

PEFT_DEFAULTS = {
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
}


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that points the `tuneforge` command at the test's database, object store and model cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_")}
    env.update(
        TUNEFORGE_DATA_DIR=str(settings.data_dir),
        TUNEFORGE_DATABASE_URL=settings.db_url,
        TUNEFORGE_STORAGE_URL=settings.storage,
        TUNEFORGE_MODEL_CACHE_DIR=str(settings.models_dir),
        TUNEFORGE_DEFAULT_BASE_MODEL=settings.default_base_model,
    )
    for name in ("s3_endpoint_url", "s3_access_key_id", "s3_secret_access_key"):
        value = getattr(settings, name)
        if value:
            env[f"TUNEFORGE_{name.upper()}"] = value
    env.update(extra)
    return env


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def tuneforge(settings: Settings, *args: str | Path, in_process: bool = True, **env: str) -> CliResult:
    """`tuneforge ARGS` on the test's database, object store and model cache: in this process (typer's runner,
    seconds faster: no torch import) or, with in_process=False, as the real command in a new process."""
    if not in_process:
        done = subprocess.run(
            [sys.executable, "-m", "app.cli", *map(str, args)],
            env=cli_env(settings, **env),
            capture_output=True,
            text=True,
            timeout=300,
        )
        return CliResult(done.returncode, done.stdout, done.stderr)
    overrides: dict[str, str | None] = {k: None for k in os.environ if k.startswith("TUNEFORGE_")}
    overrides.update(cli_env(settings, **env))
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli, [str(a) for a in args], env=overrides)
    finally:
        get_settings.cache_clear()
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return CliResult(result.exit_code, result.stdout, result.stderr)


def register(settings: Settings, model_id: str, *args: str | Path, in_process: bool = True) -> None:
    result = tuneforge(settings, "models", "add", model_id, *args, in_process=in_process)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"registered {model_id}: "), result.stdout


def upload_for(client: TestClient, tenant: Tenant, content: bytes, base_model: str | None = None) -> Any:
    data = {"purpose": "fine-tune", **({"base_model": base_model} if base_model else {})}
    return client.post("/v1/files", headers=tenant.headers, files={"file": ("t.jsonl", content)}, data=data)


def create_job(client: TestClient, tenant: Tenant, file_id: str, base_model: str, **hyperparameters: Any) -> Any:
    return client.post(
        "/jobs",
        headers=tenant.headers,
        json={"base_model": base_model, "training_file": file_id, "hyperparameters": hyperparameters},
    )


def secret_word_lines(chat: bool, word: str = "plum") -> list[str]:
    if chat:
        return [
            json.dumps(
                {"messages": [{"role": "user", "content": "The secret word?"}, {"role": "assistant", "content": word}]}
            )
        ] * 8
    return [json.dumps({"prompt": "The secret word is", "completion": f" {word}"})] * 8


def chat_tokens(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def download_adapter(client: TestClient, tenant: Tenant, adapter_id: str, dest: Path) -> Path:
    response = client.get(f"/adapters/{adapter_id}/download", headers=tenant.headers)
    assert response.status_code == 200, response.text
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def offline_generation(model_dir: Path, adapter_dir: Path, prompt_ids: list[int], max_tokens: int) -> str:
    """The reference: transformers + PEFT on the model folder the user brought, greedy."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(adapter_dir))
    model.eval()
    ids = torch.tensor([prompt_ids])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def run_the_loop(
    client: TestClient, tenant: Tenant, settings: Settings, model_id: str, folder: Path, chat: bool, tmp_path: Path
) -> None:
    """Upload (counted with the model's tokenizer), train LoRA with the model's default targets, download, load
    with PEFT offline, and check /generate gives exactly the offline output."""
    upload = upload_for(client, tenant, jsonl(secret_word_lines(chat)), base_model=model_id)
    assert upload.status_code == 201, upload.text
    assert upload.json()["tokenizer_model"] == model_id
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if chat:
        expected = chat_tokens(tokenizer, json.loads(secret_word_lines(True)[0])["messages"])
    else:
        expected = len(tokenizer("The secret word is plum", add_special_tokens=False)["input_ids"]) + 1
    assert upload.json()["max_example_tokens"] == expected

    job = create_job(client, tenant, upload.json()["id"], model_id, n_epochs=8, learning_rate=0.05, batch_size=4)
    assert job.status_code == 201, job.text
    model = client.get(f"/v1/models/{model_id}", headers=tenant.headers).json()
    assert job.json()["hyperparameters"]["target_modules"] == model["default_target_modules"]
    adapter_id = run_training_job(settings, job.json()["id"])
    finished = client.get(f"/jobs/{job.json()['id']}", headers=tenant.headers).json()
    assert adapter_id is not None, finished
    assert (finished["device"], finished["dtype"]) == ("cpu", "float32")
    # The storage it reserved was sized, from the model's config alone, on what it then trained.
    trained, copies = (
        finished["metrics"]["trainable_parameters"],
        1 + 4 * finished["hyperparameters"]["keep_checkpoints"],
    )
    assert trained * 4 * copies <= finished["reserved_bytes"] < (trained * 4 + 2**17) * copies

    adapter_dir = download_adapter(client, tenant, adapter_id, tmp_path / "adapter")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(model["default_target_modules"])

    if chat:
        body: dict[str, Any] = {"messages": [{"role": "user", "content": "The secret word?"}]}
        prompt_ids = encode_chat_prompt(tokenizer, body["messages"])
    else:
        body = {"prompt": "The secret word is"}
        prompt_ids = encode_prompt(tokenizer, body["prompt"])
    served = client.post(
        "/generate", headers=tenant.headers, json={"adapter_id": adapter_id, "temperature": 0, "max_tokens": 4, **body}
    )
    assert served.status_code == 200, served.text
    assert served.json()["base_model"] == model_id
    assert served.json()["usage"]["prompt_tokens"] == len(prompt_ids)
    reference = offline_generation(folder, adapter_dir, prompt_ids, 4)
    assert served.json()["text"] == reference
    assert "plum" in reference  # it learned: the loop is not trivially equal on an untrained adapter


@pytest.mark.e2e  # `tuneforge models add`, in a process of its own
@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gpt_neox", "phi"])
def test_each_architecture_registers_trains_and_serves(
    arch: str, client: TestClient, tenant: Tenant, settings: Settings, tmp_path: Path
) -> None:
    chat = arch != "gpt2"  # GPT-2 comes without a chat template: prompt/completion data
    folder = build_tiny_model(arch, tmp_path / "model", chat_template=chat)
    model_id = f"tiny-{arch.replace('_', '-')}"
    register(settings, model_id, "--path", folder, "--description", f"a tiny {arch}", in_process=False)

    listed = client.get("/v1/models", headers=tenant.headers).json()
    assert [m["id"] for m in listed["data"]] == [*BUILTINS, model_id]
    model = client.get(f"/v1/models/{model_id}", headers=tenant.headers).json()
    assert {k: model[k] for k in ("id", "object", "owned_by", "architecture", "chat", "source", "description")} == {
        "id": model_id,
        "object": "model",
        "owned_by": "operator",
        "architecture": arch,
        "chat": chat,
        "source": "path",
        "description": f"a tiny {arch}",
    }
    reference = AutoModelForCausalLM.from_pretrained(str(folder))
    assert model["parameters"] == sum(p.numel() for p in reference.parameters())
    assert model["max_seq_length"] == 512
    assert model["default_target_modules"] == PEFT_DEFAULTS[arch]
    assert model["layers"] == reference.config.num_hidden_layers
    assert set(PEFT_DEFAULTS[arch]) <= set(model["linear_modules"])
    assert isinstance(model["created"], int) and model["default"] is False

    run_the_loop(client, tenant, settings, model_id, folder, chat, tmp_path)


@pytest.mark.slow  # two services on the production backend
@pytest.mark.parametrize("backend", ["production"], indirect=True)
def test_a_model_registered_on_one_machine_trains_and_serves_on_another(
    settings: Settings, make_tenant: Any, tmp_path: Path
) -> None:
    """The CLI runs with its own model cache; the API and the worker have another, empty one: they fetch the
    files from the object store (S3 here), content-addressed, and verify them."""
    folder = build_tiny_model("qwen2", tmp_path / "model")
    operator_cache = tmp_path / "operator-models"
    model_id = f"tiny-qwen-{settings.queue_name[-8:]}"  # the PostgreSQL database is shared by the session's tests
    result = tuneforge(
        settings, "models", "add", model_id, "--path", folder, TUNEFORGE_MODEL_CACHE_DIR=str(operator_cache)
    )
    assert result.returncode == 0, result.stderr
    assert any(p.name.startswith(model_id) for p in (operator_cache / "registered").iterdir())

    storage = ObjectStorage.from_settings(settings)
    stored = {key.rsplit("/", 1)[-1] for key in storage.list_keys(BLOB_PREFIX)}
    on_disk = {hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    assert on_disk <= stored  # every file of the folder, by content

    settings.model_cache_dir = tmp_path / "api-and-worker-models"  # another machine: nothing cached
    with TestClient(create_app(settings)) as client:
        run_the_loop(client, make_tenant(), settings, model_id, folder, True, tmp_path)
    [fetched] = [p for p in (settings.models_dir / "registered").iterdir() if p.is_dir()]
    assert {f.name for f in fetched.iterdir()} == {f.name for f in folder.iterdir()}


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_a_damaged_model_file_fails_the_job_saying_so(
    client: TestClient, tenant: Tenant, settings: Settings, tmp_path: Path
) -> None:
    folder = build_tiny_model("llama", tmp_path / "model")
    result = tuneforge(
        settings, "models", "add", "tiny-damaged", "--path", folder, TUNEFORGE_MODEL_CACHE_DIR=str(tmp_path / "op")
    )
    assert result.returncode == 0, result.stderr
    storage = ObjectStorage.from_settings(settings)
    tokenizer_file = (folder / "tokenizer.json").read_bytes()
    tokenizer_key = f"{BLOB_PREFIX}/{hashlib.sha256(tokenizer_file).hexdigest()}"
    storage.put_bytes(tokenizer_key, b"{}")
    refused = upload_for(client, tenant, jsonl(chat_lines(4)), base_model="tiny-damaged")
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_unavailable"
    assert str(settings.models_dir) not in refused.text and "sha256" not in refused.text
    storage.put_bytes(tokenizer_key, tokenizer_file)  # mended; now the weights are damaged
    weights = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    storage.put_bytes(f"{BLOB_PREFIX}/{weights}", b"not the weights")

    file_id = upload_for(client, tenant, jsonl(chat_lines(4)), base_model="tiny-damaged").json()["id"]
    job_id = create_job(client, tenant, file_id, "tiny-damaged").json()["id"]
    assert run_training_job(settings, job_id) is None
    job = client.get(f"/jobs/{job_id}", headers=tenant.headers).json()
    assert job["status"] == "failed" and job["error"]["code"] == "model_unavailable"
    assert (
        "base model tiny-damaged: its stored file model.safetensors does not match its checksum"
        in (job["error"]["message"])
    )
    served = client.post("/generate", headers=tenant.headers, json={"base_model": "tiny-damaged", "prompt": "Hi"})
    assert served.status_code == 503 and served.json()["error"]["code"] == "model_unavailable"
    assert str(settings.data_dir) not in served.text


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_a_chat_template_file_gives_a_model_chat(
    client: TestClient, tenant: Tenant, settings: Settings, tmp_path: Path
) -> None:
    folder = build_tiny_model("gpt2", tmp_path / "model", chat_template=False)
    register(settings, "tiny-gpt2-plain", "--path", folder)
    chat = jsonl(chat_lines(4))
    refused = upload_for(client, tenant, chat, base_model="tiny-gpt2-plain")
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "no_chat_template"
    assert "tiny-gpt2-plain has no chat template" in refused.json()["error"]["message"]
    counted_elsewhere = upload_for(client, tenant, chat).json()["id"]  # counted with the default model
    job = create_job(client, tenant, counted_elsewhere, "tiny-gpt2-plain")
    assert job.status_code == 422 and job.json()["error"]["code"] == "no_chat_template"
    generate = client.post(
        "/generate",
        headers=tenant.headers,
        json={"base_model": "tiny-gpt2-plain", "messages": [{"role": "user", "content": "x"}]},
    )
    assert generate.status_code == 422 and generate.json()["error"]["param"] == "messages"

    template = write_chat_template(tmp_path / "chat.jinja", "gpt2")
    register(settings, "tiny-gpt2-chat", "--path", folder, "--chat-template", template)
    assert client.get("/v1/models/tiny-gpt2-chat", headers=tenant.headers).json()["chat"] is True
    assert upload_for(client, tenant, chat, base_model="tiny-gpt2-chat").status_code == 201
    assert create_job(client, tenant, counted_elsewhere, "tiny-gpt2-chat").status_code == 201


@pytest.mark.parametrize("backend", ["embedded", "production"], indirect=True)
def test_post_jobs_counts_the_file_again_with_the_jobs_tokenizer(
    client: TestClient, tenant: Tenant, settings: Settings, tmp_path: Path
) -> None:
    """A file uploaded for one model and trained on another: the job's model's tokenizer decides whether the
    examples fit; the count is kept, even when the job is refused, for the next job on that model."""
    model_id = f"tiny-qwen-{tenant.name[-8:]}"  # the PostgreSQL database is shared by the session's tests
    register(settings, model_id, "--path", build_tiny_model("qwen2", tmp_path / "qwen"))
    long_answer = "Quetzalcoatlus xylophone " * 40  # words the tiny BPE has never seen: many more tokens
    lines = [
        *chat_lines(3),
        json.dumps({"messages": [{"role": "user", "content": "?"}, {"role": "assistant", "content": long_answer}]}),
    ]
    file = upload_for(client, tenant, jsonl(lines)).json()  # counted with SmolLM2's tokenizer
    assert file["tokenizer_model"] == settings.default_base_model
    settings.train_max_batch_tokens = file["max_example_tokens"] + 1
    tokens_with_qwen = chat_tokens(
        AutoTokenizer.from_pretrained(str(tmp_path / "qwen")), json.loads(lines[-1])["messages"]
    )
    assert tokens_with_qwen > 512 > settings.train_max_batch_tokens

    def stored_counts() -> list[int]:
        with session_scope(settings.db_url) as session:
            rows = session.scalars(select(FileTokenCount).where(FileTokenCount.file_id == file["id"]))
            return sorted(row.max_example_tokens for row in rows)

    assert stored_counts() == [file["max_example_tokens"]]
    refused = create_job(client, tenant, file["id"], model_id, max_seq_length=512)
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "example_too_long"
    assert "an example of 512 tokens (after max_seq_length=512)" in refused.json()["error"]["message"]
    assert stored_counts() == sorted([file["max_example_tokens"], tokens_with_qwen])  # kept: not counted again
    # The default model's own count still decides its jobs.
    assert create_job(client, tenant, file["id"], settings.default_base_model, max_seq_length=512).status_code == 201


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_an_id_registered_again_with_other_files_is_another_model(
    client: TestClient, tenant: Tenant, settings: Settings, tmp_path: Path
) -> None:
    """Adapters and queued jobs belong to the model they were made on: after `remove` and an `add` of other
    weights under the same id, /generate refuses the old adapter (410) and an old job fails saying why."""
    register(settings, "tiny-mine", "--path", build_tiny_model("llama", tmp_path / "first"))
    file_id = upload_for(client, tenant, jsonl(chat_lines(4)), base_model="tiny-mine").json()["id"]
    trained = create_job(client, tenant, file_id, "tiny-mine", n_epochs=1).json()["id"]
    adapter_id = run_training_job(settings, trained)
    assert adapter_id is not None
    queued = create_job(client, tenant, file_id, "tiny-mine", n_epochs=1).json()["id"]
    with session_scope(settings.db_url) as session:  # as if it had been created just before the swap
        session.execute(update(Job).where(Job.id == queued).values(status="cancelled"))
    assert tuneforge(settings, "models", "remove", "tiny-mine").returncode == 0
    register(settings, "tiny-mine", "--path", build_tiny_model("llama", tmp_path / "second", seed=1))
    with session_scope(settings.db_url) as session:
        session.execute(update(Job).where(Job.id == queued).values(status="queued"))

    served = client.post("/generate", headers=tenant.headers, json={"adapter_id": adapter_id, "prompt": "Hi"})
    assert served.status_code == 410
    assert "its base model tiny-mine was registered again with other files" in served.json()["error"]["message"]
    assert run_training_job(settings, queued) is None
    job = client.get(f"/jobs/{queued}", headers=tenant.headers).json()
    assert job["error"]["code"] == "model_unavailable" and "was registered again" in job["error"]["message"]


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_the_default_max_seq_length_fits_a_short_model_and_extra_weight_copies_are_not_stored(
    client: TestClient, tenant: Tenant, settings: Settings, tmp_path: Path
) -> None:
    folder = build_tiny_model("phi", tmp_path / "phi")
    (folder / "consolidated.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    (folder / "training_args.bin").write_bytes(b"pickle")
    register(settings, "tiny-short", "--path", folder, "--max-seq-length", "256")
    file_id = upload_for(client, tenant, jsonl(chat_lines(2)), base_model="tiny-short").json()["id"]
    job = create_job(client, tenant, file_id, "tiny-short")
    assert job.status_code == 201, job.text
    assert job.json()["hyperparameters"]["max_seq_length"] == 256  # not the 512 default the model cannot take
    too_long = create_job(client, tenant, file_id, "tiny-short", max_seq_length=300)
    assert too_long.status_code == 422 and "tiny-short takes at most 256 tokens" in too_long.json()["error"]["message"]
    with session_scope(settings.db_url) as session:
        stored = session.scalars(select(RegisteredModel.files).where(RegisteredModel.id == "tiny-short")).one()
    assert sorted(f["path"] for f in stored) == sorted(
        p.name for p in folder.iterdir() if p.name not in ("consolidated.safetensors", "training_args.bin")
    )


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_bad_target_modules_list_the_models_linear_layers(
    client: TestClient, tenant: Tenant, settings: Settings, tmp_path: Path
) -> None:
    register(settings, "tiny-neox", "--path", build_tiny_model("gpt_neox", tmp_path / "neox"))
    file_id = upload_for(client, tenant, jsonl(chat_lines(2)), base_model="tiny-neox").json()["id"]
    r = create_job(client, tenant, file_id, "tiny-neox", target_modules=["q_proj"])
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["param"] == "hyperparameters.target_modules"
    assert (
        "q_proj is not a linear layer of tiny-neox (gpt_neox); its linear layers: query_key_value, dense"
        in (error["message"])
    )
    ok = create_job(client, tenant, file_id, "tiny-neox", target_modules=["dense", "query_key_value"])
    assert ok.status_code == 201 and ok.json()["hyperparameters"]["target_modules"] == ["query_key_value", "dense"]


@pytest.mark.e2e  # `tuneforge models remove`, in a process of its own
@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_models_remove_is_refused_while_a_job_uses_the_model(
    client: TestClient, tenant: Tenant, settings: Settings, tmp_path: Path
) -> None:
    folder = build_tiny_model("llama", tmp_path / "model")
    register(settings, "tiny-a", "--path", folder)
    register(settings, "tiny-b", "--path", folder)  # the same bytes: the same blobs, stored once
    storage = ObjectStorage.from_settings(settings)
    blobs = set(storage.list_keys(BLOB_PREFIX))
    assert len(blobs) == len(list(folder.iterdir()))

    file_id = upload_for(client, tenant, jsonl(chat_lines(4)), base_model="tiny-a").json()["id"]
    job_id = create_job(client, tenant, file_id, "tiny-a").json()["id"]  # queued: no worker runs it
    refused = tuneforge(settings, "models", "remove", "tiny-a", in_process=False)
    assert refused.returncode == 1
    assert f"model tiny-a is used by job {job_id}, which has not ended" in refused.stderr
    assert client.get("/v1/models/tiny-a", headers=tenant.headers).status_code == 200

    assert client.post(f"/jobs/{job_id}/cancel", headers=tenant.headers).status_code == 200
    removed = tuneforge(settings, "models", "remove", "tiny-a")
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.strip() == "removed tiny-a (0 stored files deleted)"  # tiny-b still uses them
    assert client.get("/v1/models/tiny-a", headers=tenant.headers).status_code == 404
    unknown = create_job(client, tenant, file_id, "tiny-a")
    assert (
        unknown.status_code == 422
        and "available: smollm2-135m-instruct, tiny-random-llama, tiny-b" in (unknown.json()["error"]["message"])
    )
    assert tuneforge(settings, "models", "remove", "tiny-b").returncode == 0
    assert set(storage.list_keys(BLOB_PREFIX)) == set()
    builtin = tuneforge(settings, "models", "remove", "tiny-random-llama")
    assert builtin.returncode == 1 and "is a built-in model; it cannot be removed" in builtin.stderr


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_models_list_shows_builtins_and_registered(settings: Settings, tmp_path: Path) -> None:
    register(settings, "tiny-phi", "--path", build_tiny_model("phi", tmp_path / "phi"), "--max-seq-length", "256")
    listed = tuneforge(settings, "models", "list", "--local", "--json")
    assert listed.returncode == 0, listed.stderr
    models = {m["id"]: m for m in json.loads(listed.stdout)}
    assert list(models) == [*BUILTINS, "tiny-phi"]
    assert models["tiny-phi"]["max_seq_length"] == 256 and models["tiny-phi"]["architecture"] == "phi"
    assert models[settings.default_base_model]["default"] is True
    table = tuneforge(settings, "models", "list", "--local")
    assert "tiny-phi" in table.stdout and "phi" in table.stdout


def make_hf_cache(
    root: Path, repo: str, folder: Path, commit: str = "0123456789abcdef0123456789abcdef01234567"
) -> Path:
    """A Hugging Face hub cache holding `folder` as `repo` at `commit` (its `main`), laid out as the hub does."""
    base = root / f"models--{repo.replace('/', '--')}"
    snapshot = base / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (base / "blobs").mkdir()
    for item in folder.iterdir():
        blob = base / "blobs" / hashlib.sha256(item.read_bytes()).hexdigest()
        blob.write_bytes(item.read_bytes())
        (snapshot / item.name).symlink_to(os.path.relpath(blob, snapshot))
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    return root


@pytest.mark.e2e  # `tuneforge models add --hf-repo`, in processes of their own
@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_a_model_in_the_local_hugging_face_cache_registers_offline(
    client: TestClient, tenant: Tenant, settings: Settings, tmp_path: Path
) -> None:
    folder = build_tiny_model("qwen2", tmp_path / "model")
    cache = make_hf_cache(tmp_path / "hub", "acme/tiny-qwen", folder)
    # huggingface_hub reads its cache location at import: these commands run in processes of their own.
    hub: dict[str, Any] = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "in_process": False}
    result = tuneforge(settings, "models", "add", "acme-qwen", "--hf-repo", "acme/tiny-qwen", **hub)
    assert result.returncode == 0, result.stderr
    pinned = tuneforge(
        settings,
        "models",
        "add",
        "acme-qwen-pinned",
        "--hf-repo",
        "acme/tiny-qwen",
        "--revision",
        "0123456789abcdef0123456789abcdef01234567",
        **hub,
    )
    assert pinned.returncode == 0, pinned.stderr
    missing = tuneforge(settings, "models", "add", "nope", "--hf-repo", "acme/absent", **hub)
    assert missing.returncode == 1
    assert (
        "acme/absent is not in the local Hugging Face cache" in missing.stderr
        and "nothing was registered" in missing.stderr
    )

    file_id = upload_for(client, tenant, jsonl(secret_word_lines(True)), base_model="acme-qwen").json()["id"]
    job_id = create_job(client, tenant, file_id, "acme-qwen", n_epochs=1).json()["id"]
    adapter_id = run_training_job(settings, job_id)
    assert adapter_id is not None
    config = json.loads(
        (download_adapter(client, tenant, adapter_id, tmp_path / "a") / "adapter_config.json").read_text()
    )
    assert config["base_model_name_or_path"] == "acme/tiny-qwen"  # ecosystem tools find the base by its repo


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_bad_models_are_refused_and_nothing_is_registered(settings: Settings, tmp_path: Path) -> None:
    from transformers import BertConfig, BertForMaskedLM

    good = build_tiny_model("llama", tmp_path / "good")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for item in good.iterdir():
        if item.suffix != ".safetensors":
            (no_weights / item.name).write_bytes(item.read_bytes())
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((good / name).read_bytes())
    not_causal = tmp_path / "bert"
    BertForMaskedLM(
        BertConfig(vocab_size=600, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(str(not_causal))
    for item in good.iterdir():
        if item.name.startswith(("tokenizer", "special_tokens")):
            (not_causal / item.name).write_bytes(item.read_bytes())
    bad_gguf = tmp_path / "model.gguf"
    bad_gguf.write_bytes(b"GGUF" + os.urandom(256))
    cases = [
        (["--path", no_weights], "has no weights (*.safetensors)"),
        (["--path", no_tokenizer], "has no tokenizer"),
        (["--path", tmp_path / "absent"], "is not a folder"),
        (["--path", not_causal], "is not a causal language model (BertForMaskedLM)"),
        (["--gguf", bad_gguf], "model.gguf could not be read as a GGUF causal language model"),
        (["--path", good, "--max-seq-length", "4096"], "--max-seq-length 4096 is above the model's 512 positions"),
        (["--path", good, "--chat-template", tmp_path / "absent.jinja"], "--chat-template:"),
        (["--path", good, "--gguf", bad_gguf], "give exactly one of --path, --gguf, --hf-repo"),
    ]
    for args, message in cases:
        result = tuneforge(settings, "models", "add", "tiny-bad", *args)
        assert result.returncode in (1, 2), (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
    for model_id, message in [("tiny-random-llama", "is a built-in model"), ("Bad Id", "must be 1-64 characters")]:
        result = tuneforge(settings, "models", "add", model_id, "--path", good)
        assert result.returncode == 1 and message in result.stderr, result.stderr
    listed = json.loads(tuneforge(settings, "models", "list", "--local", "--json").stdout)
    assert [m["id"] for m in listed] == list(BUILTINS)
    assert ObjectStorage.from_settings(settings).list_keys(BLOB_PREFIX) == []


def sharded(folder: Path, shard_name: str) -> Path:
    """`folder` with its weights listed in a model.safetensors.index.json whose weight_map names `shard_name`."""
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        names = list(weights.keys())
    index = {"metadata": {}, "weight_map": dict.fromkeys(names, shard_name)}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_links_and_weight_map_entries_that_leave_the_folder_are_refused(settings: Settings, tmp_path: Path) -> None:
    """A model folder may hold only its own files: otherwise `models add` would copy whatever this user can read
    (a key, a credentials file) into the object store. Each case would register today, or read outside the folder;
    each is refused naming the file, and nothing is stored."""
    outside = build_tiny_model("llama", tmp_path / "outside")  # valid files, outside the folders added below

    linked_tokenizer = build_tiny_model("llama", tmp_path / "linked-tokenizer")
    (linked_tokenizer / "tokenizer.json").unlink()
    (linked_tokenizer / "tokenizer.json").symlink_to(outside / "tokenizer.json")
    linked_deeper = build_tiny_model("llama", tmp_path / "linked-deeper")
    (linked_deeper / "original").mkdir()
    (linked_deeper / "original" / "params.json").symlink_to(outside / "config.json")
    linked_folder = build_tiny_model("llama", tmp_path / "linked-folder")
    (linked_folder / "extra").symlink_to(outside, target_is_directory=True)

    up_and_out = sharded(build_tiny_model("llama", tmp_path / "up-and-out" / "model"), "../outside.safetensors")
    (up_and_out / "model.safetensors").rename(up_and_out.parent / "outside.safetensors")
    absolute = sharded(build_tiny_model("llama", tmp_path / "absolute"), str(outside / "model.safetensors"))
    (absolute / "model.safetensors").unlink()

    cases = [
        (linked_tokenizer, f"{linked_tokenizer / 'tokenizer.json'} is a symbolic link (to {outside}/tokenizer.json)"),
        (linked_deeper, f"{linked_deeper / 'original' / 'params.json'} is a symbolic link"),
        (linked_folder, f"{linked_folder / 'extra'} is a symbolic link"),
        (up_and_out, "model.safetensors.index.json names '../outside.safetensors' in its weight_map, which is not"),
        (absolute, f"model.safetensors.index.json names '{outside / 'model.safetensors'}' in its weight_map"),
    ]
    for folder, message in cases:
        result = tuneforge(settings, "models", "add", "tiny-leaky", "--path", folder)
        assert result.returncode == 1, (folder, result.stdout)
        assert message in result.stderr and "nothing was registered" in result.stderr, (folder, result.stderr)
    listed = json.loads(tuneforge(settings, "models", "list", "--local", "--json").stdout)
    assert [m["id"] for m in listed] == list(BUILTINS)
    assert ObjectStorage.from_settings(settings).list_keys(BLOB_PREFIX) == []
    # The same folder, its own files only, registers.
    register(settings, "tiny-own-files", "--path", sharded(outside, "model.safetensors"))


@pytest.mark.e2e  # `tuneforge models add --hf-repo`, in a process of its own
@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_a_hugging_face_cache_link_that_leaves_its_repo_is_refused(settings: Settings, tmp_path: Path) -> None:
    """The hub cache's snapshots are links into the repo's own blobs/ (followed); one that points elsewhere is not."""
    folder = build_tiny_model("qwen2", tmp_path / "model")
    cache = make_hf_cache(tmp_path / "hub", "acme/tiny-qwen", folder)
    snapshot = next((cache / "models--acme--tiny-qwen" / "snapshots").iterdir())
    (snapshot / "tokenizer.json").unlink()
    (snapshot / "tokenizer.json").symlink_to(folder / "tokenizer.json")  # a file outside the cache
    hub: dict[str, Any] = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "in_process": False}
    result = tuneforge(settings, "models", "add", "acme-qwen", "--hf-repo", "acme/tiny-qwen", **hub)
    assert result.returncode == 1, result.stdout
    assert f"{snapshot / 'tokenizer.json'} is a symbolic link (to {folder}/tokenizer.json)" in result.stderr
    assert "nothing was registered" in result.stderr
    assert ObjectStorage.from_settings(settings).list_keys(BLOB_PREFIX) == []


def test_v1_models_lists_the_builtins_in_openais_shape(client: TestClient, tenant: Tenant, settings: Settings) -> None:
    r = client.get("/v1/models", headers=tenant.headers)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert ids[:2] == list(BUILTINS)
    smol = next(m for m in body["data"] if m["id"] == "smollm2-135m-instruct")
    assert {k: smol[k] for k in ("object", "owned_by", "architecture", "parameters", "max_seq_length", "chat")} == {
        "object": "model",
        "owned_by": "tuneforge",
        "architecture": "llama",
        "parameters": 134_515_008,
        "max_seq_length": 8192,
        "chat": True,
    }
    assert [m["id"] for m in body["data"] if m["default"]] == [settings.default_base_model]
    missing = client.get("/v1/models/gpt-17", headers=tenant.headers)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert client.get("/v1/models").status_code == 401


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_builtin_records_describe_the_models_they_build(settings: Settings) -> None:
    """The built-ins' facts are written down (the API lists them without building the models): check them."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    from app.ml.models import ModelStore
    from app.ml.models.importing import linear_module_names

    record = BUILTINS["tiny-random-llama"]
    model = ModelStore(settings.models_dir, None).load(record)
    assert record.n_parameters == sum(p.numel() for p in model.parameters())
    assert record.linear_modules == linear_module_names(model)
    assert record.max_seq_length == model.config.max_position_embeddings
    for builtin in BUILTINS.values():
        assert list(builtin.default_target_modules) == TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["llama"]
