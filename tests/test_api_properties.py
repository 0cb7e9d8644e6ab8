"""The HTTP API's document bounds every request field (size, length, count): a new endpoint or field that accepts
values of any size fails here, before it ships. (The property-based test of the whole API is tests/test_api_fuzz.py.)
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from app.core.settings import Settings
from app.main import create_app

_document_app = create_app(Settings(data_dir=Path(tempfile.mkdtemp(prefix="tuneforge-openapi-"))))


def _unbounded(schema: dict[str, Any], components: dict[str, Any], where: str) -> list[str]:
    """Places in a request schema that accept values of any size: a string without maxLength, a number without
    a maximum, an array without maxItems, an object open to any keys."""
    if "$ref" in schema:
        return _unbounded(components[schema["$ref"].rsplit("/", 1)[-1]], components, where)
    found: list[str] = []
    for key in ("anyOf", "oneOf", "allOf"):
        for i, sub in enumerate(schema.get(key, [])):
            found += _unbounded(sub, components, f"{where}|{i}")
    kind = schema.get("type")
    if "enum" in schema or "const" in schema or kind in ("boolean", "null"):
        return found
    if kind == "string" and "maxLength" not in schema and schema.get("format") != "binary":
        found.append(where)
    if kind in ("integer", "number") and "maximum" not in schema and "exclusiveMaximum" not in schema:
        found.append(where)
    if kind == "array":
        if "maxItems" not in schema:
            found.append(where)
        found += _unbounded(schema.get("items", {}), components, f"{where}[]")
    if kind == "object":
        extra = schema.get("additionalProperties", True)
        if isinstance(extra, dict) and "maxProperties" in schema and "maxLength" in schema.get("propertyNames", {}):
            found += _unbounded(extra, components, f"{where}{{}}")  # a bounded map: a few short keys
        elif extra is not False and "anyOf" not in schema:
            found.append(where)
        for name, sub in schema.get("properties", {}).items():
            found += _unbounded(sub, components, f"{where}.{name}")
    return found


def test_every_request_field_is_bounded_in_the_api_document() -> None:
    """A new endpoint or field that accepts values of any size fails here, before it ships."""
    document = _document_app.openapi()
    components = document["components"]["schemas"]
    unbounded: list[str] = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for parameter in operation.get("parameters", []):
                unbounded += _unbounded(parameter["schema"], components, f"{method} {path} {parameter['name']}")
            for media, body in operation.get("requestBody", {}).get("content", {}).items():
                unbounded += _unbounded(body["schema"], components, f"{method} {path} {media}")
    assert unbounded == []
