"""The base of response bodies that show a database row field by field (Polar's `Schema`): times as Unix seconds."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict


def unix_time(value: datetime | None) -> int | None:
    """A stored time as the API shows it: Unix seconds, or None."""
    return int(value.timestamp()) if value is not None else None


def _unix_seconds(value: object) -> object:
    return unix_time(value) if isinstance(value, datetime) else value


UnixTime = Annotated[int, BeforeValidator(_unix_seconds)]


class Schema(BaseModel):
    """`Model.model_validate(row)` reads the row's attributes of the same names."""

    model_config = ConfigDict(from_attributes=True)
