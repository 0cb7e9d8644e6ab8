"""Sweeps: several methods trained as ordinary jobs on one file, ranked by validation loss, with asynchronous
successive halving stopping the configurations behind at a shared rung; the table, the winner and the saving as a
user reads them over HTTP; every bound refused naming the field."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from app.core.settings import Settings
from app.main import create_app
from tests.conftest import Tenant, chat_lines, jsonl, live
from tests.test_cli import Cli
from tests.test_evals import ITEM_SCHEMA, STRING_CHECK, completions, items
from tests.test_fine_tuning_api import fruit_file
from worker.runner import run_training_job

pytestmark = pytest.mark.parametrize("backend", ["embedded"], indirect=True)

# Four methods; the first (LoRA at a high rate) learns fastest, so those after it that are behind at a rung stop.
CONFIGURATIONS = [
    {"method": "lora", "hyperparameters": {"learning_rate": 0.05, "target_modules": "all-linear"}},
    {"method": "ia3", "hyperparameters": {"learning_rate": 0.0001}},
    {"method": "prompt_tuning", "hyperparameters": {"learning_rate": 0.0001}},
    {"method": "head", "hyperparameters": {"learning_rate": 0.01}},
]
COMMON = {"n_epochs": 2, "batch_size": 2}


def upload(http: httpx.Client, lines: list[str], name: str) -> str:
    r = http.post("/v1/files", files={"file": (name, jsonl(lines))}, data={"purpose": "fine-tune"})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def run_queued_jobs(http: httpx.Client, settings: Settings, sweep_id: str, timeout: float = 240) -> dict[str, Any]:
    """Be the sweep's worker: train each job it queues, until it has ended."""
    deadline = time.monotonic() + timeout
    trained: set[str] = set()
    while True:
        sweep = http.get(f"/sweeps/{sweep_id}").json()
        if sweep["status"] != "running":
            return sweep  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, sweep
        for result in sweep["results"]:
            if result["job_id"] and result["job_id"] not in trained and result["status"] == "running":
                trained.add(result["job_id"])
                run_training_job(settings, result["job_id"])
        time.sleep(0.1)


@pytest.mark.slow
def test_a_sweep_ranks_four_methods_and_stops_those_behind(settings: Settings, tenant: Tenant) -> None:
    settings = settings.model_copy(update={"sweep_poll_seconds": 0.1})
    with live(create_app(settings)) as url, httpx.Client(base_url=url, headers=tenant.headers, timeout=60) as http:
        train, valid = upload(http, chat_lines(16), "train.jsonl"), upload(http, chat_lines(6), "valid.jsonl")
        r = http.post(
            "/sweeps",
            json={
                "name": "which method",
                "base_model": "tiny-random-llama",
                "training_file": train,
                "validation_file": valid,
                "configurations": [
                    {**c, "hyperparameters": {**COMMON, **c["hyperparameters"]}} for c in CONFIGURATIONS
                ],
                "budget": {"max_parallel": 1},
            },
        )
        assert r.status_code == 201, r.text
        created = r.json()
        assert created["status"] == "running" and created["rungs"] == [4, 8]  # 16 steps: a quarter, then a half
        assert len(created["results"]) == 4 and created["winner"] is None
        sweep = run_queued_jobs(http, settings, created["id"])

        assert sweep["status"] == "succeeded", sweep
        results = sweep["results"]
        assert [r["rank"] for r in results] == [1, 2, 3, 4]
        objectives = [r["objective"] for r in results]
        assert objectives == sorted(objectives)
        assert {r["method"] for r in results} == {"lora", "ia3", "prompt_tuning", "head"}
        # Each configuration is an ordinary job: its own validation loss is the objective the table shows.
        for result in results:
            job = http.get(f"/jobs/{result['job_id']}").json()
            assert job["status"] == "succeeded" and job["method"] == result["method"]
            assert result["objective"] == pytest.approx(job["metrics"]["valid_loss"])
            assert result["steps"] == job["progress"]["step"] and result["adapter_id"] == job["adapter_id"]
            assert result["trainable_parameters"] > 0 and result["peak_memory_bytes"] > 0
            assert result["tokens_per_second"] > 0 and result["wall_seconds"] >= 0
        best_job = min(results, key=lambda r: http.get(f"/jobs/{r['job_id']}").json()["metrics"]["valid_loss"])
        assert sweep["winner"]["job_id"] == best_job["job_id"] == results[0]["job_id"]

        # Elimination stopped at least one at a rung, where it published what it had trained.
        stopped = [r for r in results if r["stopped_early"]]
        assert stopped, results
        for result in stopped:
            assert result["stopped_at_step"] in sweep["rungs"] and result["steps"] == result["stopped_at_step"]
            assert result["steps"] < result["planned_steps"]
            events = http.get(f"/jobs/{result['job_id']}/events").json()["data"]
            assert any("stops here" in e["message"] for e in events)
        savings = sweep["savings"]
        assert savings["steps_trained"] == sum(r["steps"] for r in results)
        assert savings["steps_without_elimination"] == sum(r["planned_steps"] for r in results) == 64
        assert 0 < savings["saved_fraction"] == pytest.approx(1 - savings["steps_trained"] / 64, abs=1e-4)
        assert [s["id"] for s in http.get("/sweeps").json()["data"]] == [created["id"]]


@pytest.mark.slow
def test_a_sweep_without_elimination_trains_every_configuration_to_its_end(settings: Settings, tenant: Tenant) -> None:
    settings = settings.model_copy(update={"sweep_poll_seconds": 0.1})
    with live(create_app(settings)) as url, httpx.Client(base_url=url, headers=tenant.headers, timeout=60) as http:
        train = upload(http, chat_lines(12), "train.jsonl")
        r = http.post(
            "/sweeps",
            json={
                "base_model": "tiny-random-llama",
                "training_file": train,
                "grid": {
                    "methods": ["lora", "ia3"],
                    "hyperparameters": {"learning_rate": [0.01, 0.0001], "validation_split": [0.25], "n_epochs": [1]},
                },
                "objective": {"type": "validation_loss"},
                "budget": {"max_parallel": 2},
                "early_elimination": {"rule": "none"},
            },
        )
        assert r.status_code == 201, r.text
        sweep = run_queued_jobs(http, settings, r.json()["id"])
        assert sweep["status"] == "succeeded" and sweep["rungs"] == []
        assert len(sweep["results"]) == 4 and not any(r["stopped_early"] for r in sweep["results"])
        assert sweep["savings"]["saved_fraction"] == 0
        assert {(r["method"], r["hyperparameters"]["learning_rate"]) for r in sweep["results"]} == {
            ("lora", 0.01),
            ("lora", 0.0001),
            ("ia3", 0.01),
            ("ia3", 0.0001),
        }


def test_bad_sweeps_are_refused_naming_the_field(settings: Settings, tenant: Tenant) -> None:
    with live(create_app(settings)) as url, httpx.Client(base_url=url, headers=tenant.headers, timeout=60) as http:
        train = upload(http, chat_lines(8), "train.jsonl")
        base = {"base_model": "tiny-random-llama", "training_file": train}
        split = {"validation_split": 0.25}

        def refused(body: dict[str, Any]) -> dict[str, Any]:
            r = http.post("/sweeps", json={**base, **body})
            assert r.status_code == 422, r.text
            return r.json()["error"]  # type: ignore[no-any-return]

        bad = refused(
            {
                "configurations": [
                    {"method": "lora", "hyperparameters": split},
                    {"method": "lora", "hyperparameters": {**split, "learning_rate": -1}},
                ]
            }
        )
        assert bad["param"].startswith("configurations[1]") and "learning_rate" in bad["param"]
        assert refused({"configurations": [{"method": "nope", "hyperparameters": split}]})["param"].startswith(
            "configurations[0]"
        )
        assert (
            refused({"configurations": [{"method": "lora"}]})["param"]
            == "configurations[0].hyperparameters.validation_split"
        )
        many = [{"method": "lora", "hyperparameters": split}] * (settings.sweep_max_configurations + 1)
        assert refused({"configurations": many})["param"] == "configurations"
        grid = {
            "methods": ["lora", "ia3"],
            "hyperparameters": {"learning_rate": [0.1 * i for i in range(1, 17)], "lora_r": [4, 8]},
        }
        assert refused({"grid": grid})["param"] == "grid"
        assert refused({})["param"] == "configurations"
        assert http.get("/sweeps").json()["data"] == []  # nothing refused was kept
        assert http.get("/jobs").json()["data"] == []


@pytest.mark.slow
def test_the_command_line_creates_a_sweep_and_prints_its_table(settings: Settings, tenant: Tenant) -> None:
    settings = settings.model_copy(update={"sweep_poll_seconds": 0.1})
    with live(create_app(settings)) as url, httpx.Client(base_url=url, headers=tenant.headers, timeout=60) as http:
        cli = Cli(url, tenant.key)
        train, valid = upload(http, chat_lines(8), "train.jsonl"), upload(http, chat_lines(4), "valid.jsonl")
        sweep_id = cli.ok(
            "sweep",
            "create",
            train,
            "--validation-file",
            valid,
            "--base-model",
            "tiny-random-llama",
            "-c",
            'lora:{"learning_rate": 0.01, "n_epochs": 1}',
            "-c",
            'ia3:{"n_epochs": 1}',
        ).strip()
        assert sweep_id.startswith("sweep-")
        run_queued_jobs(http, settings, sweep_id)
        table = cli.ok("sweep", "get", sweep_id)
        assert "lora" in table and "ia3" in table and "succeeded" in table and "saved" in table
        assert [s["id"] for s in cli.json("sweep", "list")["data"]] == [sweep_id]
        refused = cli("sweep", "create", train, "-c", "lora:{not json")
        assert refused.returncode == 2 and "--config" in refused.stderr


@pytest.mark.slow
def test_a_sweep_ranks_by_an_evals_pass_rate(settings: Settings, tenant: Tenant) -> None:
    """The objective is a criterion of an eval, run on each configuration's adapter: the configuration that learned
    the answer wins with every item passed."""
    settings = settings.model_copy(update={"sweep_poll_seconds": 0.1})
    with live(create_app(settings)) as url, httpx.Client(base_url=url, headers=tenant.headers, timeout=60) as http:
        r = http.post("/v1/files", files={"file": ("fruit.jsonl", fruit_file())}, data={"purpose": "fine-tune"})
        train = r.json()["id"]
        fruit = http.post(
            "/v1/evals",
            json={
                "data_source_config": {"type": "custom", "item_schema": ITEM_SCHEMA},
                "testing_criteria": [STRING_CHECK],
            },
        ).json()
        data_source = completions("unused", items(2))
        del data_source["model"]
        body = {
            "base_model": "tiny-random-llama",
            "training_file": train,
            "configurations": [
                {"method": "ia3", "hyperparameters": {"learning_rate": 0.0001, "n_epochs": 1}},
                {
                    "method": "lora",
                    "hyperparameters": {"learning_rate": 0.05, "n_epochs": 8, "target_modules": "all-linear"},
                },
            ],
            "objective": {
                "type": "eval",
                "eval_id": fruit["id"],
                "testing_criteria": "says the fruit",
                "data_source": data_source,
            },
            "early_elimination": {"rule": "none"},
        }
        wrong = http.post("/sweeps", json={**body, "objective": {**body["objective"], "testing_criteria": "nope"}})
        assert wrong.status_code == 422 and wrong.json()["error"]["param"] == "objective.testing_criteria"
        r = http.post("/sweeps", json=body)
        assert r.status_code == 201, r.text
        sweep = run_queued_jobs(http, settings, r.json()["id"])
        assert sweep["status"] == "succeeded", sweep
        assert [(r["method"], r["objective"]) for r in sweep["results"]] == [("lora", 1.0), ("ia3", 0.0)]
        assert sweep["winner"]["method"] == "lora"
        runs = http.get(f"/v1/evals/{fruit['id']}/runs").json()["data"]
        assert {run["model"] for run in runs} == {r["adapter_id"] for r in sweep["results"]}


@pytest.mark.slow
def test_the_budget_skips_what_its_steps_cannot_pay_for_and_a_cancel_stops_the_rest(
    settings: Settings, tenant: Tenant
) -> None:
    settings = settings.model_copy(update={"sweep_poll_seconds": 0.1})
    with live(create_app(settings)) as url, httpx.Client(base_url=url, headers=tenant.headers, timeout=60) as http:
        train, valid = upload(http, chat_lines(8), "train.jsonl"), upload(http, chat_lines(4), "valid.jsonl")
        one_epoch = {"n_epochs": 1, "batch_size": 2}  # 4 steps each
        body = {
            "base_model": "tiny-random-llama",
            "training_file": train,
            "validation_file": valid,
            "configurations": [{"method": m, "hyperparameters": one_epoch} for m in ("lora", "ia3", "head")],
            "early_elimination": {"rule": "none"},
        }
        r = http.post("/sweeps", json={**body, "budget": {"max_parallel": 1, "max_total_steps": 8}})
        assert r.status_code == 201, r.text
        sweep = run_queued_jobs(http, settings, r.json()["id"])
        by_method = {r["method"]: r for r in sweep["results"]}
        assert [by_method[m]["status"] for m in ("lora", "ia3", "head")] == ["succeeded", "succeeded", "skipped"]
        assert by_method["head"]["job_id"] is None and sweep["savings"]["steps_trained"] == 8

        started = http.post("/sweeps", json={**body, "budget": {"max_parallel": 1}}).json()
        deadline = time.monotonic() + 30
        while not (first := http.get(f"/sweeps/{started['id']}").json()["results"][0])["job_id"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        cancelled = http.post(f"/sweeps/{started['id']}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        assert http.get(f"/jobs/{first['job_id']}").json()["status"] == "cancelled"
        time.sleep(0.5)  # a round of the controller: it starts nothing more
        after = http.get(f"/sweeps/{started['id']}").json()
        assert [r["job_id"] for r in after["results"] if r["job_id"]] == [first["job_id"]]
        assert http.post(f"/sweeps/{started['id']}/cancel").status_code == 409
