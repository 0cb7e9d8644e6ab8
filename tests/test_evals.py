"""Evals in OpenAI's shape: the graders (app/ml/graders.py) on their own, and the Evals API driven by the official
`openai` client against a real server: an eval with a `string_check` and a `score_model` criterion run on a
trained adapter and on its base model, output items paged, responses valid against OpenAI's published schemas,
bounds refused naming the field, and a run that survives its process stopping."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openai import BadRequestError, NotFoundError, OpenAI, UnprocessableEntityError

from app.core.db import session_scope
from app.core.settings import Settings
from app.evals import repository
from app.main import create_app
from app.ml.graders import (
    Grade,
    JudgeRequest,
    grader_of,
    render,
    sample_namespace,
)
from tests.conftest import Tenant, jsonl, live, upload
from tests.test_fine_tuning_api import QUESTION, fruit_file
from tests.test_openai_schemas import check
from worker.runner import run_training_job

ITEM_SCHEMA = {
    "type": "object",
    "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
    "required": ["question", "answer"],
}
STRING_CHECK = {
    "type": "string_check",
    "name": "says the fruit",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "ilike",
}
SCORE_MODEL = {
    "type": "score_model",
    "name": "judge",
    "model": "tiny-random-llama",
    "input": [{"role": "user", "content": "Expected {{item.answer}}; the answer was: {{sample.output_text}}"}],
    "range": [0, 10],
    "pass_threshold": 5,
}


# --- the graders, pure -------------------------------------------------------------------------------------
def test_templates_read_the_item_and_the_sample() -> None:
    item = {"q": "colour?", "nested": {"list": ["a", "b"]}, "n": 3}
    sample = sample_namespace('{"colour": "red"}')
    assert render("{{ item.q }} {{item.nested.list.1}} {{item.n}}", item) == "colour? b 3"
    assert render("{{sample.output_json.colour}} / {{sample.output_text}}", item, sample) == 'red / {"colour": "red"}'
    assert render("{{item.missing}}|{{other.x}}", item) == "|{{other.x}}"


def test_string_and_text_graders_score_as_openai_describes() -> None:
    item, sample = {"answer": "Plum"}, sample_namespace("I think plum.")
    ops = {op: grader_of({**STRING_CHECK, "operation": op}).grade(item, sample) for op in ("eq", "ne", "like", "ilike")}
    assert [ops[op].passed for op in ("eq", "ne", "like", "ilike")] == [False, True, False, True]
    assert ops["ilike"].score == 1.0 and ops["eq"].score == 0.0

    def similarity(metric: str, got: str, want: str, threshold: float = 0.5) -> Grade:
        spec = {"type": "text_similarity", "name": metric, "input": "{{sample.output_text}}", "reference": "{{item.a}}"}
        return grader_of({**spec, "evaluation_metric": metric, "pass_threshold": threshold}).grade(
            {"a": want}, sample_namespace(got)
        )

    sentence = "the cat sat on the mat"
    for metric in ("fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_2", "rouge_l"):
        assert similarity(metric, sentence, sentence).score == pytest.approx(1.0), metric
        unrelated = similarity(metric, "a dog barked loudly", sentence)
        assert unrelated.score < 0.3 and not unrelated.passed, metric
    assert similarity("rouge_1", "the cat sat", sentence).score == pytest.approx(2 / 3)  # F1 of 3/3 and 3/6
    assert similarity("fuzzy_match", "plum", "Plum.").score == pytest.approx(2 / 3, abs=0.01)


def test_a_json_schema_grader_checks_structured_answers() -> None:
    grader = grader_of(
        {
            "type": "json_schema",
            "name": "valid",
            "schema": {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}},
        }
    )
    assert grader.grade({}, sample_namespace('{"n": 3}')).passed
    wrong = grader.grade({}, sample_namespace('{"n": "three"}'))
    assert not wrong.passed and wrong.sample is not None and "integer" in wrong.sample["error"]
    assert not grader.grade({}, sample_namespace("n = 3")).passed


def test_model_graders_ask_their_judge_for_a_constrained_answer() -> None:
    asked: list[JudgeRequest] = []

    def judge(answer: str) -> Any:
        def ask(request: JudgeRequest) -> str:
            asked.append(request)
            return answer

        return ask

    item, sample = {"answer": "plum"}, sample_namespace("plum")
    score = grader_of(SCORE_MODEL)
    assert score.grade(item, sample, judge('{"result": 7}')) == Grade(
        7.0, True, {"output_text": '{"result": 7}', "result": 7.0}
    )
    assert score.grade(item, sample, judge('{"result": 42}')).score == 10.0  # clamped to the range
    assert not score.grade(item, sample, judge('{"result": 4.5}')).passed
    assert asked[0].model == "tiny-random-llama" and asked[0].schema["required"] == ["result"]
    assert asked[0].messages[-1] == {"role": "user", "content": "Expected plum; the answer was: plum"}
    label = grader_of(
        {
            "type": "label_model",
            "name": "tone",
            "model": "tiny-random-llama",
            "input": [{"role": "developer", "content": "Tone of: {{sample.output_text}}"}],
            "labels": ["kind", "rude"],
            "passing_labels": ["kind"],
        }
    )
    assert label.grade(item, sample, judge('{"label": "kind"}')).passed
    assert not label.grade(item, sample, judge('{"label": "rude"}')).passed
    assert asked[-1].schema["properties"]["label"]["enum"] == ["kind", "rude"]
    assert asked[-1].messages[1] == {"role": "system", "content": "Tone of: plum"}


# --- the API, through the official client ----------------------------------------------------------------
pytestmark_api = pytest.mark.parametrize("backend", ["embedded"], indirect=True)


@pytest.fixture
def adapter_id(client: TestClient, tenant: Tenant, settings: Settings) -> str:
    file_id = upload(client, tenant, fruit_file()).json()["id"]
    r = client.post(
        "/jobs",
        headers=tenant.headers,
        json={
            "base_model": "tiny-random-llama",
            "training_file": file_id,
            "hyperparameters": {"n_epochs": 8, "learning_rate": 0.05, "target_modules": "all-linear"},
        },
    )
    assert r.status_code == 201, r.text
    trained = run_training_job(settings, r.json()["id"])
    assert trained is not None
    return trained


@pytest.fixture
def openai_client(settings: Settings, tenant: Tenant) -> Iterator[OpenAI]:
    with live(create_app(settings)) as url:
        yield OpenAI(base_url=f"{url}/v1", api_key=tenant.key, max_retries=0)


def items(n: int) -> list[dict[str, Any]]:
    return [{"item": {"question": QUESTION, "answer": "plum"}} for _ in range(n)]


def completions(model: str, content: list[dict[str, Any]] | None = None, **source: Any) -> dict[str, Any]:
    return {
        "type": "completions",
        "model": model,
        "source": source or {"type": "file_content", "content": content or items(4)},
        "input_messages": {"type": "template", "template": [{"role": "user", "content": "{{item.question}}"}]},
        "sampling_params": {"temperature": 0, "max_completion_tokens": 4},
    }


def wait_for_end(client: OpenAI, eval_id: str, run_id: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        run = client.evals.runs.retrieve(run_id, eval_id=eval_id)
        if run.status not in ("queued", "in_progress"):
            assert run.status != "failed", run.error
            return run
        assert time.monotonic() < deadline, f"the run is still {run.status}"
        time.sleep(0.2)


@pytestmark_api
def test_the_openai_client_runs_an_eval_on_an_adapter_and_its_base_model(
    openai_client: OpenAI, adapter_id: str
) -> None:
    created = openai_client.evals.create(
        name="fruit",
        data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA, "include_sample_schema": True},
        testing_criteria=[STRING_CHECK, SCORE_MODEL],  # type: ignore[list-item]
        metadata={"team": "fruit"},
    )
    assert created.id.startswith("eval-") and created.name == "fruit" and created.metadata == {"team": "fruit"}
    check("Eval", created.model_dump(mode="json", by_alias=True, exclude_unset=True))
    assert openai_client.evals.retrieve(created.id).testing_criteria[0].name == "says the fruit"  # type: ignore[union-attr]

    runs = {
        model: openai_client.evals.runs.create(created.id, name=model, data_source=completions(model))  # type: ignore[arg-type]
        for model in (adapter_id, "tiny-random-llama")
    }
    ended = {model: wait_for_end(openai_client, created.id, run.id) for model, run in runs.items()}
    for model, run in ended.items():
        assert run.status == "completed", run
        assert run.result_counts.total == 4 and run.result_counts.errored == 0, run.result_counts
        by_name = {r.testing_criteria: r for r in run.per_testing_criteria_results}
        assert set(by_name) == {"says the fruit", "judge"}
        assert by_name["judge"].passed + by_name["judge"].failed == 4
        assert run.per_model_usage[0].model_name == model and run.per_model_usage[0].invocation_count == 4
    adapted = {r.testing_criteria: r.passed for r in ended[adapter_id].per_testing_criteria_results}
    base = {r.testing_criteria: r.passed for r in ended["tiny-random-llama"].per_testing_criteria_results}
    assert adapted["says the fruit"] == 4 and base["says the fruit"] == 0  # the trained behaviour, and its absence

    http = openai_client._client  # the same connection, to read the wire format as sent
    raw = http.get(
        f"{openai_client.base_url}evals/{created.id}/runs/{runs[adapter_id].id}", headers=auth(openai_client)
    )
    check("EvalRun", raw.json())

    # Output items, paged in the data's order; the adapter answered plum, the judge gave a score in its range.
    first = openai_client.evals.runs.output_items.list(runs[adapter_id].id, eval_id=created.id, limit=3)
    assert [item.datasource_item_id for item in first.data] == [0, 1, 2] and first.has_more
    every = list(openai_client.evals.runs.output_items.list(runs[adapter_id].id, eval_id=created.id, limit=3))
    assert [item.datasource_item_id for item in every] == [0, 1, 2, 3]
    one = every[0]
    assert one.status == "pass" and one.datasource_item == {"question": QUESTION, "answer": "plum"}
    assert "plum" in (one.sample.output[0].content or "").lower() and one.sample.model == adapter_id
    scores = {r.name: r for r in one.results}
    assert scores["says the fruit"].passed and scores["says the fruit"].score == 1.0
    assert 0 <= scores["judge"].score <= 10 and scores["judge"].passed == (scores["judge"].score >= 5)
    assert json.loads(scores["judge"].sample["output_text"])["result"] is not None  # type: ignore[index]
    listed = http.get(
        f"{openai_client.base_url}evals/{created.id}/runs/{runs[adapter_id].id}/output_items",
        headers=auth(openai_client),
    )
    check("EvalRunOutputItemList", listed.json())
    assert (
        openai_client.evals.runs.output_items.retrieve(one.id, eval_id=created.id, run_id=runs[adapter_id].id).id
        == one.id
    )
    failed = openai_client.evals.runs.output_items.list(runs["tiny-random-llama"].id, eval_id=created.id, status="fail")
    assert len(failed.data) == 4

    # Lists, in creation order; cancel once ended is refused; delete removes the runs with the eval.
    assert [r.id for r in openai_client.evals.runs.list(created.id)] == [
        runs[adapter_id].id,
        runs["tiny-random-llama"].id,
    ]
    check(
        "EvalRunList", http.get(f"{openai_client.base_url}evals/{created.id}/runs", headers=auth(openai_client)).json()
    )
    check("EvalList", http.get(f"{openai_client.base_url}evals", headers=auth(openai_client)).json())
    with pytest.raises(Exception) as ended_already:
        openai_client.evals.runs.cancel(runs[adapter_id].id, eval_id=created.id)
    assert getattr(ended_already.value, "status_code", None) == 409
    assert openai_client.evals.delete(created.id).deleted
    with pytest.raises(NotFoundError):
        openai_client.evals.runs.retrieve(runs[adapter_id].id, eval_id=created.id)


def auth(client: OpenAI) -> dict[str, str]:
    return {"Authorization": f"Bearer {client.api_key}"}


@pytestmark_api
def test_items_from_a_file_and_graded_answers_from_jsonl(openai_client: OpenAI, settings: Settings) -> None:
    lines = [
        json.dumps({"item": {"question": QUESTION, "answer": "plum"}, "sample": {"output_text": text}})
        for text in ("plum", "a plum!", "cherry")
    ]
    file = openai_client.files.create(file=("items.jsonl", jsonl(lines)), purpose="evals")
    assert file.purpose == "evals"
    with pytest.raises((BadRequestError, UnprocessableEntityError)) as refused:
        openai_client.files.create(file=("bad.jsonl", jsonl(['{"item": {}}', '{"question": "x"}'])), purpose="evals")
    assert "line 2" in str(refused.value)
    created = openai_client.evals.create(
        data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA},
        testing_criteria=[STRING_CHECK],  # type: ignore[list-item]
    )
    run = openai_client.evals.runs.create(
        created.id,
        data_source={"type": "jsonl", "source": {"type": "file_id", "id": file.id}},  # type: ignore[typeddict-item]
    )
    ended = wait_for_end(openai_client, created.id, run.id)
    assert ended.status == "completed"
    assert (ended.result_counts.passed, ended.result_counts.failed) == (2, 1)
    # A fine-tuning file is not an eval's.
    train = openai_client.files.create(file=("train.jsonl", fruit_file()), purpose="fine-tune")
    with pytest.raises((BadRequestError, UnprocessableEntityError)) as wrong:
        openai_client.evals.runs.create(
            created.id,
            data_source=completions("tiny-random-llama", type="file_id", id=train.id),  # type: ignore[arg-type]
        )
    assert wrong.value.body["param"] == "data_source.source.id"  # type: ignore[index]


@pytestmark_api
def test_bad_evals_and_runs_are_refused_naming_the_field(openai_client: OpenAI, settings: Settings) -> None:
    def refused(call: Any) -> dict[str, Any]:
        with pytest.raises((BadRequestError, UnprocessableEntityError, NotFoundError)) as caught:
            call()
        return caught.value.body  # type: ignore[no-any-return,return-value]

    config: Any = {"type": "custom", "item_schema": ITEM_SCHEMA}
    python = refused(
        lambda: openai_client.evals.create(
            data_source_config=config,
            testing_criteria=[{"type": "python", "name": "p", "source": "def grade(s, i): return 1"}],
        )
    )  # type: ignore[list-item]
    assert python["param"] == "testing_criteria[0].type" and "never" in python["message"]
    op = refused(
        lambda: openai_client.evals.create(
            data_source_config=config, testing_criteria=[{**STRING_CHECK, "operation": "regex"}]
        )
    )  # type: ignore[list-item]
    assert op["param"] == "testing_criteria[0].operation"
    cosine = refused(
        lambda: openai_client.evals.create(
            data_source_config=config,
            testing_criteria=[
                {
                    "type": "text_similarity",
                    "name": "c",
                    "input": "a",
                    "reference": "b",
                    "evaluation_metric": "cosine",
                    "pass_threshold": 0.5,
                }
            ],
        )
    )  # type: ignore[list-item]
    assert cosine["param"] == "testing_criteria[0].evaluation_metric" and "embedding" in cosine["message"]
    judge = refused(
        lambda: openai_client.evals.create(
            data_source_config=config, testing_criteria=[{**SCORE_MODEL, "model": "no-such-model"}]
        )
    )  # type: ignore[list-item]
    assert judge["param"] == "testing_criteria[0].model"
    many = refused(
        lambda: openai_client.evals.create(
            data_source_config=config,
            testing_criteria=[{**STRING_CHECK, "name": f"c{i}"} for i in range(settings.eval_max_criteria + 1)],
        )
    )  # type: ignore[misc]
    assert many["param"] == "testing_criteria"
    schema = refused(
        lambda: openai_client.evals.create(
            data_source_config={"type": "custom", "item_schema": {"type": "nonsense"}}, testing_criteria=[STRING_CHECK]
        )
    )  # type: ignore[list-item]
    assert schema["param"] == "data_source_config.item_schema"

    created = openai_client.evals.create(data_source_config=config, testing_criteria=[STRING_CHECK])  # type: ignore[list-item]
    mismatch = refused(
        lambda: openai_client.evals.runs.create(
            created.id,
            data_source=completions("tiny-random-llama", items(2) + [{"item": {"question": 3, "answer": "x"}}]),
        )
    )  # type: ignore[arg-type]
    assert mismatch["param"] == "data_source.source.content[2].item" and "question" in mismatch["message"]
    too_many = refused(
        lambda: openai_client.evals.runs.create(
            created.id, data_source=completions("tiny-random-llama", items(settings.eval_max_items + 1))
        )
    )  # type: ignore[arg-type]
    assert too_many["param"] == "data_source.source.content"
    model = refused(lambda: openai_client.evals.runs.create(created.id, data_source=completions("no-such-model")))  # type: ignore[arg-type]
    assert model["param"] == "data_source.model" and model["code"] == "model_not_found"
    long_template = completions("tiny-random-llama")
    long_template["input_messages"]["template"][0]["content"] = "x" * (settings.eval_max_template_chars + 1)
    template = refused(lambda: openai_client.evals.runs.create(created.id, data_source=long_template))  # type: ignore[arg-type]
    assert template["param"] == "data_source.input_messages.template"
    assert openai_client.evals.runs.list(created.id).data == []  # nothing refused was kept


@pytestmark_api
def test_another_tenant_sees_none_of_it(openai_client: OpenAI, settings: Settings, make_tenant: Any) -> None:
    created = openai_client.evals.create(
        data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA},
        testing_criteria=[STRING_CHECK],  # type: ignore[list-item]
    )
    other = OpenAI(base_url=str(openai_client.base_url), api_key=make_tenant().key, max_retries=0)
    with pytest.raises(NotFoundError):
        other.evals.retrieve(created.id)
    assert other.evals.list().data == []


@pytestmark_api
@pytest.mark.slow
def test_a_run_survives_its_process_stopping(settings: Settings, tenant: Tenant) -> None:
    """The first server answers some items and stops; a second one, on the same database, answers the rest and
    only the rest."""
    settings = settings.model_copy(update={"eval_items_at_once": 1})
    with live(create_app(settings)) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key=tenant.key, max_retries=0)
        created = client.evals.create(
            data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA},
            testing_criteria=[STRING_CHECK],  # type: ignore[list-item]
        )
        source = completions("tiny-random-llama", items(12))
        source["sampling_params"]["max_completion_tokens"] = 48
        run = client.evals.runs.create(created.id, data_source=source)  # type: ignore[arg-type]
        deadline = time.monotonic() + 60
        while count_items(settings, run.id) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    first = answered(settings, run.id)
    assert 2 <= len(first) < 12, "the first server should have stopped part-way"
    with live(create_app(settings)) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key=tenant.key, max_retries=0)
        ended = wait_for_end(client, created.id, run.id)
    assert ended.status == "completed" and ended.result_counts.total == 12
    after = answered(settings, run.id)
    assert sorted(after) == list(range(12))
    assert all(after[i] == first[i] for i in first)  # the first server's items were kept, not answered again


def count_items(settings: Settings, run_id: str) -> int:
    with session_scope(settings.db_url) as session:
        return repository.count_items(session, run_id=run_id)


def answered(settings: Settings, run_id: str) -> dict[int, str]:
    with session_scope(settings.db_url) as session:
        return {row.datasource_item_id: row.id for row in repository.output_items(session, run_id=run_id)}


@pytestmark_api  # (on a shared PostgreSQL database, the claim could take another test's run)
def test_a_dead_processs_run_is_taken_over_once_its_lease_runs_out(settings: Settings, tenant: Tenant) -> None:
    """Claims are exclusive while a lease holds; once it runs out (its process was killed) another runner takes
    the run, and the dead one can no longer write to it."""
    quiet = settings.model_copy(update={"eval_poll_seconds": 0})  # no runner in this app: the test claims by hand
    with TestClient(create_app(quiet)) as http:
        created = http.post(
            "/v1/evals",
            headers=tenant.headers,
            json={
                "data_source_config": {"type": "custom", "item_schema": ITEM_SCHEMA},
                "testing_criteria": [STRING_CHECK],
            },
        ).json()
        run = http.post(
            f"/v1/evals/{created['id']}/runs",
            headers=tenant.headers,
            json={"data_source": completions("tiny-random-llama", items(1))},
        )
        assert run.status_code == 201, run.text
        run_id = run.json()["id"]
    with session_scope(settings.db_url) as session:
        assert repository.claim_run(session, runner="dead", lease_seconds=1.5, skip=set()) == run_id
    with session_scope(settings.db_url) as session:
        assert repository.claim_run(session, runner="other", lease_seconds=60, skip=set()) is None
    time.sleep(1.6)
    with session_scope(settings.db_url) as session:
        assert repository.claim_run(session, runner="other", lease_seconds=60, skip=set()) == run_id
    with session_scope(settings.db_url) as session:
        assert not repository.renew(session, run_id=run_id, runner="dead", lease_seconds=60)
        assert repository.renew(session, run_id=run_id, runner="other", lease_seconds=60)


@pytestmark_api
@pytest.mark.slow
def test_structured_outputs_are_graded_by_their_schema(openai_client: OpenAI) -> None:
    """A run with a response format answers JSON that the `json_schema` grader finds valid (the output is
    constrained); answers given as jsonl that are not valid fail it."""
    schema = {"type": "object", "properties": {"fruit": {"enum": ["plum", "cherry"]}}, "required": ["fruit"]}
    created = openai_client.evals.create(
        data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA},
        testing_criteria=[{"type": "json_schema", "name": "valid", "schema": schema}],  # type: ignore[list-item]
    )
    source = completions("tiny-random-llama", items(3))
    source["sampling_params"].update(
        max_completion_tokens=32,
        response_format={"type": "json_schema", "json_schema": {"name": "fruit", "schema": schema}},
    )
    run = openai_client.evals.runs.create(created.id, data_source=source)  # type: ignore[arg-type]
    ended = wait_for_end(openai_client, created.id, run.id)
    answers = [
        item.sample.output[0].content for item in openai_client.evals.runs.output_items.list(run.id, eval_id=created.id)
    ]
    assert ended.result_counts.passed == 3, answers
    assert all("fruit" in json.loads(answer or "") for answer in answers)
    given = [
        {"item": {"question": QUESTION, "answer": "plum"}, "sample": {"output_text": text}}
        for text in ('{"fruit": "plum"}', '{"fruit": "fig"}', "plum")
    ]
    graded = openai_client.evals.runs.create(
        created.id,
        data_source={"type": "jsonl", "source": {"type": "file_content", "content": given}},  # type: ignore[typeddict-item]
    )
    statuses = (
        [item.status for item in openai_client.evals.runs.output_items.list(graded.id, eval_id=created.id)]
        if wait_for_end(openai_client, created.id, graded.id)
        else []
    )
    assert statuses == ["pass", "fail", "fail"]
