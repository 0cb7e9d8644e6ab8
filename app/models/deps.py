"""The process's base models (`ModelStore`: their files and tokenizers), as a FastAPI dependency."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.ml.models import ModelStore


def get_model_store(request: Request) -> ModelStore:
    return request.app.state.models  # type: ignore[no-any-return]


ModelStoreDep = Annotated[ModelStore, Depends(get_model_store)]
