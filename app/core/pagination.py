"""Cursor pagination in OpenAI's shape, one way for every list: newest first, `after` = the last id seen.

Every list answers the one generic body, `ListPage[T]`: `{"object": "list", "data": [...], "has_more": ...}`;
a list whose OpenAI counterpart names its page's ends (`GET /v1/files`) answers `IdPage[T]`, which adds
`first_id` and `last_id`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Generic, Literal, Protocol, TypeVar

from fastapi import Query
from pydantic import BaseModel
from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import Session

from app.core.errors import ErrorCode, InvalidInput, clip

LimitQuery = Annotated[int, Query(ge=1, le=100, description="How many items to return (1-100)")]
AfterQuery = Annotated[
    str | None, Query(max_length=64, description="Return the items after this id (the last id of the previous page)")
]
DEFAULT_LIMIT = 20

T = TypeVar("T")
R = TypeVar("R")
Item = TypeVar("Item")


class ListObject(BaseModel, Generic[Item]):
    """OpenAI's list object; alone, a list that is never paged (`/v1/models`)."""

    object: Literal["list"] = "list"
    data: list[Item]


class ListPage(ListObject[Item], Generic[Item]):
    """One page of a list: `has_more` says whether another follows (`after` = the last id of this one)."""

    has_more: bool


class IdPage(ListPage[Item], Generic[Item]):
    """A page that also names its first and last items' ids (null when empty), as OpenAI's files list does."""

    first_id: str | None
    last_id: str | None

    @classmethod
    def of(cls, data: list[Item], *, has_more: bool) -> IdPage[Item]:
        ends: list[Any] = data[:1] + data[-1:]  # items with an `id`
        return cls(
            data=data, has_more=has_more, first_id=ends[0].id if ends else None, last_id=ends[-1].id if ends else None
        )


class Listed(Protocol):
    id: Any
    created_at: Any


def newest_first(
    session: Session, query: Select[T], model: type[Listed], *, limit: int, after: Listed | None
) -> tuple[list[T], bool]:
    """One page of `query`, ordered newest first (ties broken by id), after the cursor row; and has_more."""
    return in_creation_order(session, query, model, limit=limit, after=after, oldest_first=False)


def in_creation_order(
    session: Session, query: Select[T], model: type[Listed], *, limit: int, after: Listed | None, oldest_first: bool
) -> tuple[list[T], bool]:
    """One page of `query` in creation order, newest or oldest first (ties broken by id), after the cursor row; and
    has_more. (OpenAI's evals lists take `order`: asc, their default, or desc.)"""
    if after is not None:
        tie = model.created_at == after.created_at
        past = (
            or_(model.created_at > after.created_at, and_(tie, model.id > after.id))
            if oldest_first
            else or_(model.created_at < after.created_at, and_(tie, model.id < after.id))
        )
        query = query.where(past)
    order = (model.created_at.asc(), model.id.asc()) if oldest_first else (model.created_at.desc(), model.id.desc())
    rows = list(session.scalars(query.order_by(*order).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def cursor_row(after: str | None, lookup: Callable[[str], R | None]) -> R | None:
    """The row an `after` id names (looked up in the tenant's own items), or a 422 if there is none."""
    if after is None:
        return None
    row = lookup(after)
    if row is None:
        raise InvalidInput(f"after: no item with id {clip(after)}", param="after", code=ErrorCode.invalid_cursor)
    return row
