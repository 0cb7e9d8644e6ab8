"""DPO jobs and jobs that continue from a fine-tuned model, through the API as users drive them: the official
`openai` client's SFT-then-DPO path on a live server, a DPO job that moves the preference (measured on the
downloaded adapter loaded with PEFT offline), and the refusals, each a 422 naming the field."""

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

from app.core.settings import Settings
from app.ml.formatting import IGNORE_INDEX
from app.ml.models import BUILTINS, ModelStore
from app.ml.training.preference import encode_pairs
from tests.conftest import Tenant, chat_lines, jsonl, upload
from tests.test_dpo import preference_line
from tests.test_fine_tuning_api import QUESTION, fruit_file, openai_client, wait_for  # noqa: F401
from tests.test_worker import events
from worker.runner import run_training_job

TINY = BUILTINS["tiny-random-llama"]


def preference_file(lines: list[dict[str, Any]]) -> bytes:
    return jsonl([json.dumps(line) for line in lines])


def colour_lines(n: int, preferred: str = "blue", non_preferred: str = "red", start: int = 0) -> list[dict[str, Any]]:
    return [preference_line(f"Pick a colour for item {i}.", preferred, non_preferred) for i in range(start, start + n)]


def test_sft_then_dpo_from_its_adapter_with_the_openai_client(
    openai_client: OpenAI,  # noqa: F811
    client: TestClient,
    tenant: Tenant,
    settings: Settings,
) -> None:
    openai = openai_client
    sft_file = openai.files.create(file=("fruit.jsonl", fruit_file()), purpose="fine-tune")
    sft = openai.fine_tuning.jobs.create(
        model="tiny-random-llama",
        training_file=sft_file.id,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 8, "learning_rate_multiplier": 250}},
        },
    )
    assert run_training_job(settings, sft.id) is not None
    sft = openai.fine_tuning.jobs.retrieve(sft.id)
    assert sft.status == "succeeded" and sft.fine_tuned_model is not None

    dpo_file = openai.files.create(file=("prefs.jsonl", preference_file(colour_lines(8))), purpose="fine-tune")
    assert client.get(f"/v1/files/{dpo_file.id}", headers=tenant.headers).json()["format"] == "preference"
    created = openai.fine_tuning.jobs.create(
        training_file=dpo_file.id,
        model=sft.fine_tuned_model,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "n_epochs": 2}}},
    )
    assert created.status == "queued" and created.model == sft.fine_tuned_model  # as OpenAI names it
    assert created.method is not None and created.method.type == "dpo" and created.method.dpo is not None
    dpo_hp = created.method.dpo.hyperparameters
    assert dpo_hp is not None and dpo_hp.beta == pytest.approx(0.1) and dpo_hp.n_epochs == 2
    assert dpo_hp.learning_rate_multiplier == pytest.approx(1.0)
    native = client.get(f"/jobs/{created.id}", headers=tenant.headers).json()
    assert native["objective"] == "dpo" and native["method"] == "lora" and native["base_model"] == "tiny-random-llama"
    assert native["hyperparameters"]["init_from"] == sft.fine_tuned_model
    assert native["hyperparameters"]["lora_r"] == 8 and native["hyperparameters"]["beta"] == 0.1

    worker = threading.Thread(target=run_training_job, args=(settings, created.id))
    worker.start()
    job = wait_for(openai, created.id)
    worker.join()
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model is not None and job.fine_tuned_model != sft.fine_tuned_model
    log = [e["message"] for e in events(client, tenant, job.id)]
    assert f"training starts from the weights of {sft.fine_tuned_model}" in log
    assert "reference log-probabilities computed once for 8 preference pairs" in log  # the SFT adapter's
    steps = [e for e in openai.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"]
    assert steps and {
        "train_loss",
        "train_rewards_chosen",
        "train_rewards_rejected",
        "train_rewards_margins",
        "train_rewards_accuracies",
    } <= set(steps[0].data or {})
    first = min(steps, key=lambda e: (e.data or {})["step"]).data or {}
    assert first["train_loss"] == pytest.approx(0.693147, abs=1e-4)  # the policy starts as its reference
    curves = client.get(f"/jobs/{job.id}/metrics", headers=tenant.headers).json()["curves"]
    assert len(curves["train_rewards_margins"]) == 4

    # The DPO model kept what the SFT one learned: it still answers the SFT question the SFT way.
    for model in (sft.fine_tuned_model, job.fine_tuned_model):
        reply = openai.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTION}], max_completion_tokens=3, temperature=0
        )
        assert (reply.choices[0].message.content or "").strip().startswith("plum"), model

    with pytest.raises(UnprocessableEntityError) as refused:  # another method than the SFT adapter's
        openai.fine_tuning.jobs.create(
            training_file=dpo_file.id, model=sft.fine_tuned_model, method={"type": "ia3", "ia3": {}}
        )
    assert refused.value.body["param"] == "method.type" and refused.value.body["code"] == "method_mismatch"  # type: ignore[index]


def sequence_log_probs(model: Any, pairs: list[Any]) -> list[tuple[float, float]]:
    """Each pair's (preferred, non-preferred) summed log-probability of the output tokens, computed plainly."""
    found = []
    with torch.no_grad():
        for pair in pairs:
            sides = []
            for example in (pair.chosen, pair.rejected):
                ids = torch.tensor([example.input_ids])
                logps = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
                targets = torch.tensor(example.labels[1:])
                keep = targets != IGNORE_INDEX
                sides.append(float(logps[keep].gather(1, targets[keep][:, None]).sum()))
            found.append((sides[0], sides[1]))
    return found


@pytest.mark.slow  # trains until the preference moves
def test_a_dpo_job_moves_the_preference_on_held_out_prompts(
    tmp_path: Path, client: TestClient, tenant: Tenant, settings: Settings, model_cache_dir: Path
) -> None:
    models = ModelStore(model_cache_dir, None)
    tokenizer = models.tokenizer(TINY)
    base = models.load(TINY).eval()
    # Held-out prompts, and of two answers the one the base model likes less there: that one is preferred.
    held_out = colour_lines(6, "green", "yellow", start=100)
    before = sequence_log_probs(base, encode_pairs(held_out, tokenizer, 512).examples)
    preferred, non_preferred = ("green", "yellow") if sum(g - y for g, y in before) < 0 else ("yellow", "green")
    held_out = colour_lines(6, preferred, non_preferred, start=100)
    before = sequence_log_probs(base, encode_pairs(held_out, tokenizer, 512).examples)
    upside_down = [i for i, (p, n) in enumerate(before) if p < n]
    assert len(upside_down) >= 3

    file_id = upload(client, tenant, preference_file(colour_lines(12, preferred, non_preferred))).json()["id"]
    r = client.post(
        "/jobs",
        headers=tenant.headers,
        json={
            "base_model": "tiny-random-llama",
            "objective": "dpo",
            "training_file": file_id,
            "hyperparameters": {"n_epochs": 3, "learning_rate": 0.02, "beta": 0.5, "validation_split": 0.25},
        },
    )
    assert r.status_code == 201, r.text
    assert r.json()["objective"] == "dpo" and r.json()["hyperparameters"]["beta"] == 0.5
    adapter_id = run_training_job(settings, r.json()["id"])
    assert adapter_id is not None
    job = client.get(f"/jobs/{r.json()['id']}", headers=tenant.headers).json()
    assert job["metrics"]["valid_rewards_accuracies"] == 1.0 and job["metrics"]["valid_rewards_margins"] > 0

    archive = client.get(f"/adapters/{adapter_id}/download", headers=tenant.headers).content
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        tar.extractall(tmp_path / "adapter", filter="data")
    tuned = PeftModel.from_pretrained(models.load(TINY), str(tmp_path / "adapter")).eval()
    after = sequence_log_probs(tuned, encode_pairs(held_out, tokenizer, 512).examples)
    for i in upside_down:
        assert after[i][0] > after[i][1], (i, before[i], after[i])


def test_refusals_name_the_field(client: TestClient, tenant: Tenant, settings: Settings, make_tenant: Any) -> None:
    def create(**body: Any) -> Any:
        return client.post(
            "/jobs", headers=tenant.headers, json={"base_model": "tiny-random-llama", "dry_run": True, **body}
        )

    def refused(response: Any, param: str, code: str | None = None) -> str:
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["param"] == param, error
        if code is not None:
            assert error["code"] == code, error
        return str(error["message"])

    # Bad preference lines: each named by line and field.
    bad = [
        colour_lines(1)[0],
        {**colour_lines(1)[0], "preferred_output": [{"role": "user", "content": "x"}]},
        {
            "input": {"messages": [{"role": "user", "content": "Hi"}]},
            "preferred_output": [{"role": "assistant", "content": "a"}],
        },
        {**colour_lines(1)[0], "non_preferred_output": [{"role": "assistant", "content": " "}]},
    ]
    r = upload(client, tenant, preference_file(bad))
    assert r.status_code == 422
    report = r.json()["error"]["report"]["errors"]
    assert [(e["line"], e["code"]) for e in report] == [
        (2, "invalid_role"),
        (3, "missing_field"),
        (4, "empty_content"),
    ]
    assert report[0]["message"].startswith("preferred_output[0]:") and "non_preferred_output" in report[1]["message"]
    assert report[2]["message"].startswith("non_preferred_output[0]:")

    chat = upload(client, tenant, jsonl(chat_lines(8))).json()["id"]
    prefs = upload(client, tenant, preference_file(colour_lines(8))).json()["id"]
    assert create(training_file=prefs, objective="dpo").status_code == 200
    message = refused(create(training_file=chat, objective="dpo"), "training_file", "file_format_mismatch")
    assert "preference" in message
    refused(create(training_file=prefs), "training_file", "file_format_mismatch")
    refused(
        create(training_file=prefs, validation_file=chat, objective="dpo"), "validation_file", "file_format_mismatch"
    )
    refused(create(training_file=chat, hyperparameters={"beta": 0.2}), "hyperparameters.beta")
    refused(create(training_file=prefs, objective="dpo", hyperparameters={"beta": 0}), "hyperparameters.beta")
    refused(create(training_file=prefs, objective="ppo"), "objective")

    # Continuing from an adapter: its own tenant only, its method, its shape.
    sft = client.post(
        "/jobs",
        headers=tenant.headers,
        json={
            "base_model": "tiny-random-llama",
            "training_file": chat,
            "suffix": "first",
            "hyperparameters": {"n_epochs": 1, "lora_r": 4, "checkpoint_every": 1},
        },
    ).json()["id"]
    adapter_id = run_training_job(settings, sft)
    assert adapter_id is not None
    checkpoint = client.get(f"/jobs/{sft}/checkpoints", headers=tenant.headers).json()["data"][0]["id"]
    for name in (adapter_id, "tiny-random-llama:first", checkpoint):
        plan = create(base_model=name, training_file=prefs, objective="dpo")
        assert plan.status_code == 200, plan.text
        hp = plan.json()["hyperparameters"]
        assert hp["init_from"] == (checkpoint if name == checkpoint else adapter_id) and hp["lora_r"] == 4
        assert plan.json()["base_model"] == "tiny-random-llama"
    refused(
        create(base_model=adapter_id, method="ia3", training_file=prefs, objective="dpo"), "method", "method_mismatch"
    )
    message = refused(
        create(base_model=adapter_id, training_file=prefs, objective="dpo", hyperparameters={"lora_r": 8}),
        "hyperparameters.lora_r",
    )
    assert "lora_r=4" in message
    other = make_tenant()
    for name in (adapter_id, "adapter-doesnotexist"):  # another tenant's adapter is as unknown as a missing one
        r = client.post(
            "/jobs",
            headers=other.headers,
            json={"base_model": name, "training_file": upload(client, other, jsonl(chat_lines(8))).json()["id"]},
        )
        message = refused(r, "base_model", "model_not_found")
        assert "no base model, adapter or checkpoint" in message
