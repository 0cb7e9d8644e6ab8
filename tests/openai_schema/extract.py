"""Extract the schemas of OpenAI's published OpenAPI description (github.com/openai/openai-openapi, `openapi.json`)
that the responses of Tuneforge's OpenAI-compatible routes must validate against, with every schema they refer
to, into `components.json` next to this file (tests/test_openai_schemas.py reads it; nothing is downloaded at
test time).

    python tests/openai_schema/extract.py PATH/TO/openapi.json COMMIT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# The responses checked (and, through them, what they refer to).
ROOTS = [
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionResponse",
    "ListFilesResponse",
    "OpenAIFile",
    "DeleteFileResponse",
    "FineTuningJob",
    "ListPaginatedFineTuningJobsResponse",
    "ListFineTuningJobEventsResponse",
    "ListFineTuningJobCheckpointsResponse",
    "ListModelsResponse",
    "Model",
    "DeleteModelResponse",
    "WebhookFineTuningJobSucceeded",
    "WebhookFineTuningJobFailed",
    "WebhookFineTuningJobCancelled",
    "ErrorResponse",
    "Eval",
    "EvalList",
    "EvalRun",
    "EvalRunList",
    "EvalRunOutputItem",
    "EvalRunOutputItemList",
]
PREFIX = "#/components/schemas/"


def refs(value: Any) -> set[str]:
    found: set[str] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            ref = item.get("$ref")
            if isinstance(ref, str) and ref.startswith(PREFIX):
                found.add(ref[len(PREFIX) :])
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def strip(value: Any) -> Any:
    """The schema as JSON Schema 2020-12 reads it: without OpenAI's documentation extensions (`x-oaiMeta`,
    examples), and with the OpenAPI 3.0 keywords the file still uses said in JSON Schema's words (`nullable: true`
    adds null to the type and the enum; a boolean `exclusiveMinimum` makes `minimum` exclusive)."""
    if isinstance(value, list):
        return [strip(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: strip(v) for k, v in value.items() if not k.startswith("x-oai") and k not in ("example", "nullable")}
    if value.get("nullable") is True:
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        if isinstance(out.get("enum"), list) and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
        if "type" not in out and "enum" not in out:  # (a $ref or a combination): null, or what it says
            out = {"anyOf": [out, {"type": "null"}]}
    for bound in ("Minimum", "Maximum"):
        if isinstance(out.get(f"exclusive{bound}"), bool):
            exclusive = out.pop(f"exclusive{bound}")
            if exclusive and bound.lower() in out:
                out[f"exclusive{bound}"] = out.pop(bound.lower())
    return out


def main(path: str, commit: str) -> None:
    schemas = json.loads(Path(path).read_text())["components"]["schemas"]
    kept: dict[str, Any] = {}
    todo = list(ROOTS)
    while todo:
        name = todo.pop()
        if name in kept:
            continue
        kept[name] = strip(schemas[name])
        todo.extend(refs(kept[name]) - set(kept))
    out = {"source": f"https://github.com/openai/openai-openapi/blob/{commit}/openapi.json", "schemas": kept}
    target = Path(__file__).with_name("components.json")
    target.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"{len(kept)} schemas, {target.stat().st_size} bytes -> {target}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
