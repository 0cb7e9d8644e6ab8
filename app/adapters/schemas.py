"""Response bodies for adapters."""

from __future__ import annotations

from typing import Literal

from app.core.schemas import Schema, UnixTime


class AdapterObject(Schema):
    id: str
    object: Literal["adapter"] = "adapter"
    name: str | None
    base_model: str
    method: str
    job_id: str
    format: str
    size_bytes: int
    sha256: str
    created_at: UnixTime


class AdapterDeleted(Schema):
    id: str
    object: Literal["adapter"] = "adapter"
    deleted: bool = True
