"""Response bodies for adapters."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from app.core.schemas import Schema, UnixTime


class AdapterObject(Schema):
    id: str
    object: Literal["adapter"] = "adapter"
    name: str | None
    base_model: str
    method: str
    job_id: str | None = Field(description="The job that trained it; null for a Tinker run's sampler weights")
    tinker_path: str | None = Field(
        default=None, description="For a Tinker run's sampler weights: their `tinker://` path"
    )
    format: str
    size_bytes: int
    sha256: str
    created_at: UnixTime


class AdapterDeleted(Schema):
    id: str
    object: Literal["adapter"] = "adapter"
    deleted: bool = True
