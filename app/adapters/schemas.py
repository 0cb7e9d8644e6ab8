"""Response bodies for adapters."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from app.core.models import Adapter


class AdapterObject(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    name: str | None
    base_model: str
    method: str
    job_id: str
    format: str
    size_bytes: int
    sha256: str
    created_at: int

    @classmethod
    def of(cls, row: Adapter) -> AdapterObject:
        return cls(
            id=row.id,
            name=row.name,
            base_model=row.base_model,
            method=row.method,
            job_id=row.job_id,
            format=row.format,
            size_bytes=row.size_bytes,
            sha256=row.sha256,
            created_at=int(row.created_at.timestamp()),
        )


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterObject]
    has_more: bool
