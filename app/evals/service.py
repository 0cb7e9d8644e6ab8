"""Evals and their runs: what is checked when they are created (every bound, the item schema, the models), and
the objects OpenAI's Evals API answers. Runs execute in the API processes (app/evals/runner.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import jsonschema
from pydantic import ValidationError
from sqlalchemy.orm import Session

from app.core.errors import AppError, Conflict, ErrorCode, InvalidInput, NotFound, clip
from app.core.ids import new_id
from app.core.models import Eval, EvalOutputItem, EvalRun
from app.core.pagination import cursor_row
from app.core.schemas import unix_time
from app.core.settings import Settings
from app.core.storage import ObjectStorage
from app.evals import repository
from app.evals.schemas import (
    CompletionsSource,
    CriterionResult,
    DataItem,
    EvalCreate,
    EvalObject,
    EvalUpdate,
    FileContent,
    ItemReference,
    ModelUsage,
    OutputItemObject,
    ResultCounts,
    RunCreate,
    RunError,
    RunObject,
    Template,
)
from app.files.service import get_file
from app.inference.service import resolve_model
from app.ml.graders import content_text, lookup
from app.ml.jsonl import LineIssue, read_records

EVALS_PURPOSE = "evals"
# The `sample` namespace graders read (OpenAI's, for a custom data source with include_sample_schema).
SAMPLE_SCHEMA = {
    "type": "object",
    "properties": {
        "model": {"type": "string"},
        "output_text": {"type": "string"},
        "output_json": {"type": "object"},
        "finish_reason": {"type": "string"},
    },
    "required": ["output_text"],
}


# --- evals -------------------------------------------------------------------------------------------------
def _template_chars(criteria: list[dict[str, Any]]) -> int:
    total = 0
    for criterion in criteria:
        total += len(criterion.get("input", "")) if isinstance(criterion.get("input"), str) else 0
        total += len(criterion.get("reference", ""))
        for message in criterion.get("input", []) if isinstance(criterion.get("input"), list) else []:
            total += len(content_text(message["content"]))
    return total


def _check_schema(schema: dict[str, Any], param: str) -> None:
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InvalidInput(f"not a valid JSON schema: {clip(exc.message, 200)}", param=param) from None


def create_eval(session: Session, *, settings: Settings, tenant_id: str, body: EvalCreate) -> Eval:
    criteria = body.testing_criteria
    if len(criteria) > settings.eval_max_criteria:
        raise InvalidInput(
            f"an eval may have at most {settings.eval_max_criteria} testing criteria (got {len(criteria)})",
            param="testing_criteria",
        )
    if _template_chars(criteria) > settings.eval_max_template_chars:
        raise InvalidInput(
            f"the testing criteria's templates hold more than {settings.eval_max_template_chars:,} characters",
            param="testing_criteria",
        )
    config = body.data_source_config
    if len(json.dumps(config.item_schema)) > settings.eval_max_item_bytes:
        raise InvalidInput(
            f"item_schema is larger than {settings.eval_max_item_bytes:,} bytes", param="data_source_config.item_schema"
        )
    _check_schema(config.item_schema, "data_source_config.item_schema")
    for i, criterion in enumerate(criteria):
        if "model" in criterion:
            _resolve(session, tenant_id, criterion["model"], param=f"testing_criteria[{i}].model")
        if criterion["type"] == "json_schema":
            _check_schema(criterion["schema"], f"testing_criteria[{i}].schema")
    properties: dict[str, Any] = {"item": config.item_schema}
    if config.include_sample_schema:
        properties["sample"] = SAMPLE_SCHEMA
    row = Eval(
        id=new_id("eval"),
        tenant_id=tenant_id,
        name=body.name or "",
        data_source_config={
            "type": "custom",
            "schema": {"type": "object", "properties": properties, "required": list(properties)},
        },
        testing_criteria=criteria,
        user_metadata=body.metadata,
    )
    session.add(row)
    session.flush()
    return row


def _resolve(session: Session, tenant_id: str, model: str, *, param: str) -> None:
    try:
        resolve_model(session, tenant_id=tenant_id, model=model)
    except NotFound as exc:
        raise NotFound(exc.message, param=param, code=ErrorCode.model_not_found) from None


def get_eval(session: Session, *, tenant_id: str, eval_id: str) -> Eval:
    row = repository.get_eval(session, tenant_id=tenant_id, eval_id=eval_id)
    if row is None:
        raise NotFound(f"no eval with id {clip(eval_id)}", param="eval_id")
    return row


def list_evals(
    session: Session, *, tenant_id: str, limit: int, after: str | None, ascending: bool
) -> tuple[list[Eval], bool]:
    cursor = cursor_row(after, lambda eval_id: repository.get_eval(session, tenant_id=tenant_id, eval_id=eval_id))
    return repository.list_evals(session, tenant_id=tenant_id, limit=limit, after=cursor, ascending=ascending)


def update_eval(session: Session, *, tenant_id: str, eval_id: str, body: EvalUpdate) -> Eval:
    row = get_eval(session, tenant_id=tenant_id, eval_id=eval_id)
    if body.name is not None:
        row.name = body.name
    if body.metadata is not None:
        row.user_metadata = body.metadata
    session.flush()
    return row


def delete_eval(session: Session, *, tenant_id: str, eval_id: str) -> str:
    """Delete the eval with its runs and their output items (a run in progress stops at its next write)."""
    get_eval(session, tenant_id=tenant_id, eval_id=eval_id)
    repository.delete_eval(session, eval_id=eval_id)
    return eval_id


def eval_object(row: Eval) -> EvalObject:
    return EvalObject(
        id=row.id,
        name=row.name,
        data_source_config=row.data_source_config,
        testing_criteria=row.testing_criteria,
        created_at=unix_time(row.created_at) or 0,
        metadata=row.user_metadata or {},
    )


# --- runs --------------------------------------------------------------------------------------------------
def _file_items(
    session: Session, storage: ObjectStorage, settings: Settings, *, tenant_id: str, file_id: str
) -> list[DataItem]:
    param = "data_source.source.id"
    try:
        file = get_file(session, tenant_id=tenant_id, file_id=file_id)
    except NotFound as exc:
        raise NotFound(exc.message, param=param, code=ErrorCode.file_not_found) from None
    if file.purpose != EVALS_PURPOSE:
        raise InvalidInput(
            f"file {file.id} was uploaded for {file.purpose}: an eval run reads a file uploaded with purpose "
            f"{EVALS_PURPOSE!r}",
            param=param,
        )
    items: list[DataItem] = []
    try:
        for number, record in read_records(storage.iter_bytes(file.storage_key)):
            if len(items) == settings.eval_max_items:
                raise InvalidInput(f"the file holds more than {settings.eval_max_items:,} items", param=param)
            try:
                items.append(DataItem.model_validate(record))
            except ValidationError as exc:
                where = ".".join(str(part) for part in exc.errors()[0]["loc"])
                raise InvalidInput(
                    f"file {file.id}, line {number}: {where or 'the line'} is not what an eval item holds "
                    "(`item`, an object, and optionally `sample`, an object)",
                    param=param,
                ) from None
    except LineIssue as exc:
        raise InvalidInput(f"file {file.id} does not hold eval items: {exc.message}", param=param) from None
    return items


def _check_items(settings: Settings, row: Eval, items: list[DataItem], *, where: str, need_sample: bool) -> None:
    if len(items) > settings.eval_max_items:
        raise InvalidInput(f"a run may have at most {settings.eval_max_items:,} items (got {len(items)})", param=where)
    validator = jsonschema.Draft202012Validator(row.data_source_config["schema"]["properties"]["item"])
    for i, data in enumerate(items):
        if len(json.dumps(data.item)) > settings.eval_max_item_bytes:
            raise InvalidInput(
                f"item {i} is larger than {settings.eval_max_item_bytes:,} bytes", param=f"{where}[{i}].item"
            )
        error = next(iter(validator.iter_errors(data.item)), None)
        if error is not None:
            path = "/".join(str(p) for p in error.absolute_path)
            at = f" at {path}" if path else ""
            raise InvalidInput(
                f"item {i} does not match the eval's item_schema{at}: {clip(error.message, 200)}",
                param=f"{where}[{i}].item",
            )
        if need_sample and not data.sample:
            raise InvalidInput(
                f"item {i} has no `sample`: a jsonl run grades answers given with the items",
                param=f"{where}[{i}].sample",
            )


def _check_messages(settings: Settings, source: CompletionsSource, items: list[DataItem]) -> None:
    messages = source.input_messages
    if messages is None:
        raise InvalidInput(
            "a completions run needs `input_messages` (a template, or a reference to the items' messages)",
            param="data_source.input_messages",
            code=ErrorCode.missing_field,
        )
    if isinstance(messages, Template):
        chars = sum(len(content_text(m.content)) for m in messages.template)
        if chars > settings.eval_max_template_chars:
            raise InvalidInput(
                f"the template holds more than {settings.eval_max_template_chars:,} characters",
                param="data_source.input_messages.template",
            )
        return
    assert isinstance(messages, ItemReference)
    name, _, path = messages.item_reference.partition(".")
    if name != "item" or not path:
        raise InvalidInput(
            "must name a field of the items: item.<field>", param="data_source.input_messages.item_reference"
        )
    for i, data in enumerate(items):
        referenced = lookup(data.item, path)
        valid = (
            isinstance(referenced, list)
            and referenced
            and all(
                isinstance(m, dict) and m.get("role") in ("user", "assistant", "system", "developer") and "content" in m
                for m in referenced
            )
        )
        if not valid:
            raise InvalidInput(
                f"item {i}'s {messages.item_reference} is not a list of messages ({{role, content}})",
                param="data_source.input_messages.item_reference",
            )


def create_run(
    session: Session,
    *,
    settings: Settings,
    storage: ObjectStorage,
    tenant_id: str,
    eval_id: str,
    body: RunCreate,
    add: bool = True,
) -> EvalRun:
    """The run, checked (every bound, every item against the eval's schema, the model) and, with `add`, queued for
    the runner (`add=False`: the checks only, as a sweep makes them before its jobs have adapters)."""
    row = get_eval(session, tenant_id=tenant_id, eval_id=eval_id)
    source = body.data_source
    if isinstance(source.source, FileContent):
        items, where = source.source.content, "data_source.source.content"
    else:
        items = _file_items(session, storage, settings, tenant_id=tenant_id, file_id=source.source.id)
        where = "data_source.source"
    _check_items(settings, row, items, where=where, need_sample=source.type == "jsonl")
    model = ""
    if isinstance(source, CompletionsSource):
        _check_messages(settings, source, items)
        _resolve(session, tenant_id, source.model, param="data_source.model")
        response_format = source.sampling_params.response_format if source.sampling_params else None
        if response_format is not None and response_format.type == "json_schema":
            if response_format.json_schema is None:
                raise InvalidInput(
                    'required with "type": "json_schema"',
                    param="data_source.sampling_params.response_format.json_schema",
                    code=ErrorCode.missing_field,
                )
            _check_schema(
                response_format.json_schema.json_schema,
                "data_source.sampling_params.response_format.json_schema.schema",
            )
        model = source.model
    data_source = source.model_dump(exclude_none=True, by_alias=True)
    if isinstance(source.source, FileContent):
        data_source["source"] = {"type": "file_content"}  # the items are kept once, in `items`
    run = EvalRun(
        id=new_id("evalrun"),
        tenant_id=tenant_id,
        eval_id=row.id,
        name=body.name or model or source.type,
        model=model,
        data_source=data_source,
        items=[item.model_dump(exclude_none=True) for item in items],
        user_metadata=body.metadata,
    )
    if add:
        session.add(run)
        session.flush()
    return run


def pass_rate(session: Session, run: EvalRun, criterion: str) -> float | None:
    """The share of the run's items that passed `criterion` (None before any item was graded by it)."""
    passed, failed = _tally(session, run).criteria.get(criterion, (0, 0))
    return passed / (passed + failed) if passed + failed else None


@dataclass
class _Tally:
    """A run's counts so far, from its output items: by status, per criterion (passed, failed), and usage."""

    statuses: dict[str, int] = field(default_factory=lambda: {"pass": 0, "fail": 0, "error": 0})
    criteria: dict[str, tuple[int, int]] = field(default_factory=dict)
    usage: dict[str, int] = field(
        default_factory=lambda: {"invocation_count": 0, "prompt_tokens": 0, "completion_tokens": 0}
    )


def _tally(session: Session, run: EvalRun) -> _Tally:
    tally = _Tally()
    for status, results, sample in repository.summaries(session, run_id=run.id):
        tally.statuses[status] = tally.statuses.get(status, 0) + 1
        for result in results:
            passed, failed = tally.criteria.get(result["name"], (0, 0))
            tally.criteria[result["name"]] = (passed + 1, failed) if result["passed"] else (passed, failed + 1)
        if sample.get("usage"):
            tally.usage["invocation_count"] += 1
            tally.usage["prompt_tokens"] += sample["usage"]["prompt_tokens"]
            tally.usage["completion_tokens"] += sample["usage"]["completion_tokens"]
    return tally


def get_run(session: Session, *, tenant_id: str, eval_id: str, run_id: str) -> EvalRun:
    run = repository.get_run(session, tenant_id=tenant_id, eval_id=eval_id, run_id=run_id)
    if run is None:
        raise NotFound(f"no run with id {clip(run_id)} in eval {clip(eval_id)}", param="run_id")
    return run


def list_runs(
    session: Session,
    *,
    tenant_id: str,
    eval_id: str,
    status: str | None,
    limit: int,
    after: str | None,
    ascending: bool,
) -> tuple[list[EvalRun], bool]:
    get_eval(session, tenant_id=tenant_id, eval_id=eval_id)
    cursor = cursor_row(
        after, lambda run_id: repository.get_run(session, tenant_id=tenant_id, eval_id=eval_id, run_id=run_id)
    )
    return repository.list_runs(session, eval_id=eval_id, status=status, limit=limit, after=cursor, ascending=ascending)


def cancel_run(session: Session, *, tenant_id: str, eval_id: str, run_id: str) -> EvalRun:
    run = get_run(session, tenant_id=tenant_id, eval_id=eval_id, run_id=run_id)
    if not repository.cancel_run(session, run_id=run.id):
        session.refresh(run)
        raise Conflict(
            f"run {run.id} has already ended ({run.status})", param="run_id", code=ErrorCode.run_not_cancellable
        )
    session.refresh(run)
    return run


def delete_run(session: Session, *, tenant_id: str, eval_id: str, run_id: str) -> str:
    run = get_run(session, tenant_id=tenant_id, eval_id=eval_id, run_id=run_id)
    repository.delete_run(session, run_id=run.id)
    return run.id


def run_object(session: Session, run: EvalRun) -> RunObject:
    """The run as OpenAI answers it: counts from its output items so far (all of them once it has ended)."""
    tally = _tally(session, run)
    counts, usage = tally.statuses, tally.usage
    data_source = dict(run.data_source)
    if data_source["source"]["type"] == "file_content":
        data_source["source"] = {"type": "file_content", "content": run.items}
    per_model = []
    if usage["invocation_count"]:
        total = usage["prompt_tokens"] + usage["completion_tokens"]
        per_model.append(ModelUsage(model_name=run.model, total_tokens=total, **usage))
    return RunObject(
        id=run.id,
        eval_id=run.eval_id,
        name=run.name,
        model=run.model,
        status=run.status,
        created_at=unix_time(run.created_at) or 0,
        report_url=f"/v1/evals/{run.eval_id}/runs/{run.id}/output_items",
        data_source=data_source,
        result_counts=ResultCounts(
            total=sum(counts.values()), errored=counts["error"], failed=counts["fail"], passed=counts["pass"]
        ),
        per_model_usage=per_model,
        per_testing_criteria_results=[
            CriterionResult(testing_criteria=name, passed=passed, failed=failed)
            for name, (passed, failed) in tally.criteria.items()
        ],
        metadata=run.user_metadata or {},
        error=RunError(code=run.error_code, message=run.error_message or "") if run.error_code else None,
    )


def list_output_items(
    session: Session,
    *,
    tenant_id: str,
    eval_id: str,
    run_id: str,
    status: str | None,
    limit: int,
    after: str | None,
    ascending: bool,
) -> tuple[EvalRun, list[EvalOutputItem], bool]:
    run = get_run(session, tenant_id=tenant_id, eval_id=eval_id, run_id=run_id)
    cursor = cursor_row(after, lambda item_id: repository.get_output_item(session, run_id=run.id, item_id=item_id))
    rows, has_more = repository.list_output_items(
        session, run_id=run.id, status=status, limit=limit, after=cursor, ascending=ascending
    )
    return run, rows, has_more


def get_output_item(
    session: Session, *, tenant_id: str, eval_id: str, run_id: str, item_id: str
) -> tuple[EvalRun, EvalOutputItem]:
    run = get_run(session, tenant_id=tenant_id, eval_id=eval_id, run_id=run_id)
    row = repository.get_output_item(session, run_id=run.id, item_id=item_id)
    if row is None:
        raise NotFound(f"no output item with id {clip(item_id)} in run {run.id}", param="output_item_id")
    return run, row


def output_item_object(run: EvalRun, row: EvalOutputItem) -> OutputItemObject:
    return OutputItemObject(
        id=row.id,
        run_id=run.id,
        eval_id=run.eval_id,
        created_at=unix_time(row.created_at) or 0,
        status=row.status,
        datasource_item_id=row.datasource_item_id,
        datasource_item=run.items[row.datasource_item_id]["item"],
        results=row.results,
        sample=row.sample,
    )


def error_of(exc: AppError) -> dict[str, str]:
    """An error as a run or an output item shows it: its code and its message (never internals)."""
    return {"code": str(exc.code), "message": exc.message}
